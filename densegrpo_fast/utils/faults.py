"""Fault injection for the robustness tests, driven by DENSEGRPO_FAULT (a ';'-separated list of specs):

  after_epoch:<e>          SIGKILL this process after epoch e's metrics are logged
  in_checkpoint:<e>        SIGKILL inside epoch e's checkpoint write (before the rename)
  slow_rank:<r>:<seconds>  rank r sleeps that long at the end of every epoch (its clock runs ahead)
  reward_error:<r>         every reward call on rank r raises (a reward that fails on one rank only)
  nan_loss:<r>             every training loss on rank r is NaN (a divergence on one rank only)
  node_local_fs:<r>        rank r looks for the run folder's start-up token elsewhere (as on a node that does not
                           share the run folder's filesystem)

Unset in normal runs: every check is a string comparison.
"""
from __future__ import annotations

import os
import signal


def _specs() -> list[str]:
    return [s.strip() for s in os.environ.get("DENSEGRPO_FAULT", "").split(";") if s.strip()]


def kill_at(point: str, epoch: int) -> None:
    if f"{point}:{epoch}" in _specs():
        os.kill(os.getpid(), signal.SIGKILL)


def slow_seconds(rank: int) -> float:
    for s in _specs():
        parts = s.split(":")
        if len(parts) == 3 and parts[0] == "slow_rank" and int(parts[1]) == rank:
            return float(parts[2])
    return 0.0


def node_local_fs(rank: int) -> bool:
    return f"node_local_fs:{rank}" in _specs()


def nan_loss(rank: int) -> bool:
    return f"nan_loss:{rank}" in _specs()


def reward_fails(rank: int) -> bool:
    return f"reward_error:{rank}" in _specs()
