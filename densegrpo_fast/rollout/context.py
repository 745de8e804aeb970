"""What a credit method may use during a rollout — never the trainer.

RolloutContext bundles the model seam (network, VAE, text cache, family), the schedule, the reward pipeline, the
velocity the rollout runs (graphed / compiled as configured), the rank geometry, a progress-bar factory and the RNG
factory (utils/seeding.py: every draw keyed by the trajectory's global index, never by the rank).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..utils import seeding
from ..models.base import Cond


@dataclass
class RolloutContext:
    cfg: object                 # config.Config
    models: object              # models.base.Models: transformer, vae/decode, text cache, latent_shape, family
    sched: object               # rollout.schedule.NoiseSchedule of the rollout
    reward: object              # rewards.CombinedReward: submit (rollout.driver.score), __call__
    velocity: object            # GuidedVelocity / GraphedVelocity the rollout runs
    prompts: list               # the training prompts (ids index into it)
    rank: int
    world: int
    n_local: int                # trajectories (rows) per rank
    n_global: int
    n_train_steps: int
    device: torch.device
    progress: Callable          # progress(total, desc) -> a tqdm-like bar

    @property
    def seed(self) -> int:
        return self.cfg.run.seed

    def conditioning(self, prompts: list[str]) -> Cond:
        """Cached text conditioning for a batch (host LRU -> device) with the CFG negative."""
        return self.models.text.conditioning(prompts)

    def global_rows(self, sl: slice) -> list[int]:
        """Global indices of the local rows sl (rank r holds rows r * n_local ... (r + 1) * n_local - 1)."""
        first = self.rank * self.n_local
        return list(range(first + sl.start, first + sl.stop))

    def noise(self, epoch: int, rows: list, tag: int, device=None) -> seeding.RowNoise:
        """One normal stream per row, keyed by (seed, epoch, row, tag); rows are global indices (or tuples)."""
        keys = [(self.seed, epoch, *(r if isinstance(r, tuple) else (r,)), tag) for r in rows]
        return seeding.RowNoise(device or self.device, keys)

    def initial_noise(self, epoch: int, rows: list) -> torch.Tensor:
        """(n, C, h, w) z_0 of the given global rows."""
        return self.noise(epoch, rows, seeding.TAG_INITIAL_NOISE).randn(self.models.latent_shape)
