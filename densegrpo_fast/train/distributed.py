"""torch.distributed set-up for both launch modes (`python train.py`, `deepspeed train.py`) and the collectives the
trainer needs, including the ones that make every rank take the same decision.

Rule: a decision that leads to a collective (stop, evaluate, save, fail) is never taken from one rank's local state;
it goes through `agree_any` / `agree_max` / `raise_if_any_failed`, so every rank takes the same branch.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist


class RankFailure(RuntimeError):
    """Raised on every rank when some rank failed: the message names the rank(s) and their error."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """-> (rank, world_size, device). gloo on CPU, nccl on CUDA; a single process gets a world of one.

    timeout_s bounds every collective: a rank that dies outside an agreed failure point stops the others after
    this many seconds instead of hanging them forever.
    """
    import deepspeed
    if "RANK" not in os.environ:  # a single process: a world of one (MASTER_ADDR/PORT kept when given)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR") or "127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False,
                                   timeout=datetime.timedelta(seconds=float(timeout_s)))
        if device.type == "cpu":
            _unlink_shm_buffer()
    return dist.get_rank(), dist.get_world_size(), device


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce keeps a 66 MB shared-memory workspace per rank in /dev/shm and never removes it:
    every CPU run used to leave one behind per rank (tens of GB after a few hundred runs). Once every rank has mapped
    its peers' workspaces (DeepSpeed opens them during initialisation; the barrier makes sure all ranks are past it),
    each rank unlinks its own name: the mappings stay valid, and nothing is left when the processes end, however
    they end. Name: deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (DeepSpeed's shm.cpp)."""
    barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(name)
    except OSError:  # no shm workspace (another DeepSpeed build or backend): nothing to clean
        pass


def _multi() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor of the same shape from every rank along dim 0 (rank order)."""
    if not _multi():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_reduce_max(x: int, device) -> int:
    if not _multi():
        return x
    t = torch.tensor([x], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def agree_max(x: float, device) -> float:
    """The largest value of x over the ranks (fp64), the same on every rank."""
    if not _multi():
        return float(x)
    t = torch.tensor([float(x)], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def agree_any(flag: bool, device) -> bool:
    """True on every rank when flag is True on any rank."""
    return agree_max(1.0 if flag else 0.0, device) > 0.5


def all_reduce_sum_int(x: int, device) -> int:
    if not _multi():
        return x
    t = torch.tensor([x], device=device, dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over the ranks (a new tensor; the input is untouched)."""
    if not _multi():
        return t.clone()
    out = t.clone()
    dist.all_reduce(out)
    return out


def raise_if_any_failed(error: Optional[BaseException], device, what: str) -> None:
    """A failure point every rank passes: each says whether it failed and why; if any did, every rank raises.

    The failing rank re-raises its own exception; the others raise RankFailure naming the failed rank(s) and their
    messages, so every process stops with the reason, none waits in the next collective.
    """
    if not _multi():
        if error is not None:
            raise error
        return
    msg = None if error is None else f"{type(error).__name__}: {error}"
    if not agree_any(msg is not None, device):
        return
    msgs: list = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, msg)
    if error is not None:
        raise error
    failed = "; ".join(f"rank {r}: {m}" for r, m in enumerate(msgs) if m is not None)
    raise RankFailure(f"{what} failed on another rank — {failed}")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_shared_filesystem(folder: str, rank: int, device) -> None:
    """Every rank must see the run folder rank 0 writes (the model build, checkpoints and `latest` assume one shared
    filesystem). Rank 0 writes a token, every rank reads it after a barrier; a rank that cannot fails all ranks."""
    if not _multi():
        return
    path = os.path.join(folder, ".shared_fs_token")
    token = None
    if rank == 0:
        token = f"{os.getpid()}-{socket.gethostname()}-{datetime.datetime.now().timestamp()}"
        with open(path, "w") as f:
            f.write(token)
    box = [token]
    dist.broadcast_object_list(box, src=0)
    barrier()
    from ..utils import faults
    why = None
    try:
        with open(path + (".node-local" if faults.node_local_fs(rank) else "")) as f:
            if f.read().strip() != box[0]:
                why = f"'{path}' holds another run's token"
    except OSError as exc:
        why = str(exc)
    err = None if why is None else RuntimeError(
        f"rank {rank} on host {socket.gethostname()} cannot see the run folder '{folder}' written by rank 0 ({why}); "
        f"multi-node runs need one filesystem shared by every node (README: multi-node)")
    raise_if_any_failed(err, device, "the shared-filesystem check")
    barrier()
    if rank == 0:
        try:
            os.remove(path)
        except OSError:
            pass
