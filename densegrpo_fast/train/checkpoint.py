"""Atomic checkpoints: DeepSpeed engine state (weights, optimizer), RNG states per rank, LoRA + EMA in diffusers format.

Layout: <run>/checkpoints/epoch-00003/{DeepSpeed files, rng_rank{r}.pt, lora/, lora_ema/} and <run>/checkpoints/latest
(the tag, written last with os.replace). A checkpoint is first written under `.tmp-epoch-*` and renamed only when
every rank has finished, so a run killed at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Optional

import numpy as np
import torch

from ..utils.io import atomic_write_text
from ..utils import faults
from .distributed import barrier, raise_if_any_failed


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(engine, root: str, epoch: int, client_state: dict, rank: int, lora_sd: Optional[dict],
                    ema_sd: Optional[dict], lora_meta: Optional[dict] = None, keep_last: int = 2,
                    device="cpu", family: str = None) -> str:
    from ..models.lora import save_lora
    tag = f"epoch-{epoch:05d}"
    tmp = f".tmp-{tag}"
    if rank == 0 and os.path.exists(os.path.join(root, tmp)):
        shutil.rmtree(os.path.join(root, tmp))
    barrier()
    engine.save_checkpoint(root, tag=tmp, client_state=client_state, save_latest=False)
    torch.save(rng_state(), os.path.join(root, tmp, f"rng_rank{rank}.pt"))
    barrier()
    faults.kill_at("in_checkpoint", epoch)
    error = None
    if rank == 0:
        try:
            if lora_sd is not None:
                save_lora(os.path.join(root, tmp, "lora"), lora_sd, lora_meta, family)
            if ema_sd is not None:
                save_lora(os.path.join(root, tmp, "lora_ema"), ema_sd, lora_meta, family)
            final = os.path.join(root, tag)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(root, tmp), final)
            atomic_write_text(os.path.join(root, "latest"), tag)
            old = sorted(d for d in os.listdir(root) if d.startswith("epoch-"))[:-keep_last]
            for d in old:
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        except Exception as exc:  # e.g. a full disk: the previous checkpoint stays `latest`; every rank stops
            error = exc
    raise_if_any_failed(error, device, f"writing checkpoint {tag}")
    return tag


def latest_tag(root: str) -> Optional[str]:
    path = os.path.join(root, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not os.path.isdir(os.path.join(root, tag)):
        raise FileNotFoundError(f"checkpoint '{os.path.join(root, tag)}' named by '{path}' is missing")
    return tag


def load_checkpoint(engine, root: str, tag: str, rank: int) -> dict:
    _, client_state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"checkpoint '{os.path.join(root, tag)}' could not be loaded by DeepSpeed")
    rng_path = os.path.join(root, tag, f"rng_rank{rank}.pt")
    if os.path.exists(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))
    return client_state
