"""Credit assignment: one interface, one implementation per method, all on the same rollout machinery.

A method decides (1) how trajectories are sampled and scored — `rollout()` returns latents, log-probs and a matrix of
scores (n_local, R) whose last column is the final image's reward — and (2) how scores become per-step advantages —
`advantages()` maps the gathered (N, R) scores to (N, T). Methods:
  sparse        Flow-GRPO: R = 1, A_i broadcast to every step (optionally one SDE window per group: Flow-GRPO-Fast)
  dense         DenseGRPO: R = T+1 completion rewards Q_0..Q_T, gains g_k = Q_{k+1} - Q_k, per-step normalisation
  turning_point TP-GRPO: the same Q, turning points get Q_T - Q_k
  branching     TempFlow-GRPO: ODE main path with K one-step SDE branches (see credit/branching.py)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..utils import seeding
from .advantages import group_advantages


@dataclass
class RolloutResult:
    latents: torch.Tensor          # (n, T+1, C, h, w) fp32, on the host
    log_probs: torch.Tensor        # (n, T) fp32
    noise_levels: torch.Tensor     # (T,) or per-trajectory (n, T) — what the SDE used
    train_mask: Optional[torch.Tensor]  # (n, T) bool: steps that carry a trainable action, None = all
    futures: list = field(default_factory=list)  # per batch: Future of (rewards (b,), parts) for completion scores
    score_cols: int = 1
    completion_nfe: int = 0        # network evaluations spent on completions/branches (already in the NFE count)
    decodes: int = 0
    row_order: Optional[torch.Tensor] = None  # the row of each returned score, when chunks are not in row order

    def wait_rewards(self) -> torch.Tensor:
        """-> (n, R) scores; re-raises a reward failure with its message."""
        vals = torch.cat([f.result()[0] for f in self.futures]).view(-1, self.score_cols)
        if self.row_order is not None:
            out = torch.empty_like(vals)
            out[self.row_order] = vals
            return out
        return vals


def global_rows(trainer, sl: slice) -> list[int]:
    """Global trajectory indices of the local rows sl (rank r holds rows r * n_local ... (r + 1) * n_local - 1)."""
    first = trainer.rank * trainer.n_local
    return list(range(first + sl.start, first + sl.stop))


def draw_noise(trainer, epoch: int, sl: slice) -> torch.Tensor:
    """(n, C, h, w) initial noise of the local rows sl, each keyed by its global index (rank-count independent)."""
    keys = [(trainer.cfg.run.seed, epoch, r, seeding.TAG_INITIAL_NOISE) for r in global_rows(trainer, sl)]
    return seeding.RowNoise(trainer.device, keys).randn(trainer.models.latent_shape)


def sde_noise(trainer, epoch: int, sl: slice) -> seeding.RowNoise:
    """Per-row streams for the SDE steps of the local rows sl, keyed by global index."""
    keys = [(trainer.cfg.run.seed, epoch, r, seeding.TAG_SDE_NOISE) for r in global_rows(trainer, sl)]
    return seeding.RowNoise(trainer.device, keys)


def batches(n: int, size: int):
    for b, s in enumerate(range(0, n, size)):
        yield b, slice(s, min(s + size, n))


class SparseCredit:
    """Flow-GRPO: A_i = normalised final reward, the same for every step of trajectory i."""

    def __init__(self, cfg, sched):
        self.cfg, self.sched = cfg, sched

    def group_size(self, g: int) -> int:
        """Rows normalised together (prompt groups)."""
        return g

    def rows_per_prompt(self, g: int) -> int:
        return g

    def step_weights(self) -> Optional[torch.Tensor]:
        """TempFlow-GRPO's noise-aware weights w_k = std_k / mean_j std_j over the trained steps (std_k = s_k sqrt|dt_k|
        for "sde"), or None (uniform)."""
        if not self.cfg.credit.noise_aware_weights:
            return None
        return noise_aware_weights(self.sched, self.cfg)

    def window_levels(self, trainer, epoch: int, local_ids: torch.Tensor):
        """Flow-GRPO-Fast: one window of `credit.window` SDE steps per group; ODE (a = 0) elsewhere."""
        T, W = self.sched.steps, self.cfg.credit.window
        if W <= 0:
            return self.sched.noise_levels, None
        n = local_ids.numel()
        G = self.cfg.train.group_size
        first = trainer.rank * n
        g = seeding.generator("cpu", self.cfg.run.seed, epoch, seeding.TAG_WINDOW)
        n_groups = math.ceil(trainer.n_global / G)
        hi = max(1, trainer.n_train_steps - W + 1)
        starts = torch.randint(0, hi, (n_groups,), generator=g)[(first + torch.arange(n)) // G]
        steps = torch.arange(T)
        mask = (steps[None] >= starts[:, None]) & (steps[None] < starts[:, None] + W)
        levels = self.sched.noise_levels.cpu()[None].expand(n, T) * mask
        return levels.to(trainer.device), mask

    def rollout(self, trainer, velocity, local_ids: torch.Tensor, epoch: int) -> RolloutResult:
        from ..rollout.sampler import sde_rollout
        sc = self.cfg.sampling
        levels, mask = self.window_levels(trainer, epoch, local_ids)
        prompts = [trainer.train_prompts[i] for i in local_ids.tolist()]
        lats, lps, futures, decodes = [], [], [], 0
        bar = trainer._bar(len(prompts), f"rollout {epoch}")
        for b, sl in batches(len(prompts), sc.sample_batch):
            cond = trainer.conditioning(prompts[sl])
            z0 = draw_noise(trainer, epoch, sl)
            lv = levels[sl] if levels.dim() == 2 else levels
            traj = sde_rollout(velocity, cond, z0, self.sched.sigmas, lv, sde_noise(trainer, epoch, sl), sc.variant,
                               sc.logprob_reduction, sc.cps_logprob)
            images = trainer.models.decode(traj.latents[:, -1])
            decodes += images.shape[0]
            futures.append(trainer.reward.submit(images, prompts[sl]))
            lats.append(traj.latents.cpu())
            lps.append(traj.log_probs.cpu())
            bar.update(sl.stop - sl.start)
        bar.close()
        return RolloutResult(torch.cat(lats), torch.cat(lps), levels.cpu() if levels.dim() == 2 else levels,
                             mask, futures, 1, 0, decodes)

    def advantages(self, scores: torch.Tensor, group_ids: torch.Tensor, tc) -> tuple[torch.Tensor, dict]:
        a = group_advantages(scores[:, -1], group_ids, tc.adv_std, tc.adv_clip)
        A = a[:, None].expand(-1, self.sched.steps).contiguous()
        return A, {"adv_abs_mean": a.abs().mean().item(), "adv_zero_frac": (a == 0).float().mean().item()}


def noise_aware_weights(sched, cfg) -> torch.Tensor:
    from ..ops.reference import step_coefficients
    T = sched.steps
    n_train = max(1, int(math.floor(cfg.train.timestep_fraction * T)))
    co = step_coefficients(sched.sigmas, sched.noise_levels, torch.arange(T, device=sched.sigmas.device), 1,
                           cfg.sampling.variant)
    return co.std / co.std[:n_train].mean()


def make_credit(cfg, sched):
    m = cfg.credit.method
    if m == "sparse":
        return SparseCredit(cfg, sched)
    if m in ("dense", "turning_point"):
        from .dense import DenseCredit
        return DenseCredit(cfg, sched)
    if m == "branching":
        from .branching import BranchingCredit
        return BranchingCredit(cfg, sched)
    raise ValueError(f"credit.method: unknown method {m!r}")
