"""Credit assignment: how trajectories are sampled and scored, and how scores become per-step advantages.

A credit method is a composition (`CreditMethod`) of
  a sampler  — how one batch is sampled and which latents are scored (`SDESampler`, `CompletionSampler`), run by
               the rollout driver (rollout/driver.py), or a sampler with its own row layout (`BranchSampler`), which
               scores through the driver's one decode-and-score path;
  a scorer   — gathered (N, R) scores -> (N, T) advantages (`FinalRewardAdvantages`, `GainAdvantages`,
               `TurningPointAdvantages`, `BranchAdvantages`).
Methods (docs/algorithms.md §4-7):
  sparse        Flow-GRPO: SDE rollout, R = 1, A_i broadcast to every step (optionally one SDE window per group)
  dense         DenseGRPO: SDE rollout + completions, R = T+1 scores Q_0..Q_T, step gains, per-step normalisation
  turning_point TP-GRPO: the same Q, turning points get Q_T - Q_k
  branching     TempFlow-GRPO: ODE main path with K one-step SDE branches (credit/branching.py)
Credit code receives a rollout.context.RolloutContext, never the trainer.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..rollout.driver import RolloutResult, SampledBatch, batched_rollout
from .advantages import group_advantages


class SDESampler:
    """Flow-GRPO's policy: the SDE rollout; the final latent is scored (R = 1)."""
    desc = "rollout"

    def __call__(self, ctx, cond, z0, noise, levels) -> SampledBatch:
        from ..rollout.sampler import sde_rollout
        sc = ctx.cfg.sampling
        traj = sde_rollout(ctx.velocity, cond, z0, ctx.sched.sigmas, levels, noise, sc.variant,
                           sc.logprob_reduction, sc.cps_logprob)
        return SampledBatch(traj.latents, traj.log_probs, traj.latents[:, -1:])


class FinalRewardAdvantages:
    """Flow-GRPO: A_i = group-normalised final reward, the same at every step of trajectory i."""

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, scores: torch.Tensor, group_ids: torch.Tensor, tc) -> tuple[torch.Tensor, dict]:
        a = group_advantages(scores[:, -1], group_ids, tc.adv_std, tc.adv_clip)
        A = a[:, None].expand(-1, self.steps).contiguous()
        return A, {"adv_abs_mean": a.abs().mean().item(), "adv_zero_frac": (a == 0).float().mean().item()}


class CreditMethod:
    """A sampler and a scorer, composed. rollout(ctx, local_ids, epoch) -> RolloutResult;
    advantages(scores (N, R), group_ids (N,), train config) -> (N, T) advantages and statistics.
    A sampler with its own row layout (branching) also defines rollout, rows_per_prompt and group_size."""

    def __init__(self, cfg, sched, sampler, scorer):
        self.cfg, self.sched = cfg, sched
        self.sampler, self.scorer = sampler, scorer

    def rows_per_prompt(self, g: int) -> int:
        """Rows (trajectories or branches) per prompt of the epoch, for group size g."""
        return self.sampler.rows_per_prompt(g) if hasattr(self.sampler, "rows_per_prompt") else g

    def group_size(self, g: int) -> int:
        """Rows normalised together."""
        return self.sampler.group_size(g) if hasattr(self.sampler, "group_size") else g

    def trained_steps(self) -> list[int]:
        """The steps that carry trained pairs: a branching sampler's branch steps, else the first
        floor(timestep_fraction * T) steps from credit.train_from_step on."""
        if getattr(self.sampler, "steps", None) is not None:
            return list(self.sampler.steps)
        n_train = max(1, int(math.floor(self.cfg.train.timestep_fraction * self.sched.steps)))
        return list(range(self.cfg.credit.train_from_step, n_train))

    def step_weights(self) -> Optional[torch.Tensor]:
        """TempFlow-GRPO's noise-aware weights (credit.noise_aware_weights), mean one over the trained steps, or
        None (uniform)."""
        return noise_aware_weights(self.sched, self.cfg, self.trained_steps()) \
            if self.cfg.credit.noise_aware_weights else None

    def rollout(self, ctx, local_ids: torch.Tensor, epoch: int) -> RolloutResult:
        if hasattr(self.sampler, "rollout"):       # a sampler with its own row layout (branching)
            res = self.sampler.rollout(ctx, local_ids, epoch)
        else:
            res = batched_rollout(ctx, local_ids, epoch, self.sampler, self.sampler.desc)
        res.train_mask = from_step_mask(res.train_mask, res.log_probs.shape, self.cfg.credit.train_from_step)
        return res

    def advantages(self, scores: torch.Tensor, group_ids: torch.Tensor, tc) -> tuple[torch.Tensor, dict]:
        return self.scorer(scores, group_ids, tc)


def from_step_mask(mask: Optional[torch.Tensor], shape, k0: int) -> Optional[torch.Tensor]:
    """credit.train_from_step: the rollout's (n, T) train mask (None = all steps) with the steps k < k0 masked."""
    if not k0:
        return mask
    keep = (torch.arange(shape[1]) >= k0)[None].expand(shape[0], -1)
    return keep.clone() if mask is None else mask & keep.to(mask.device)


def noise_aware_weights(sched, cfg, steps: Optional[list[int]] = None) -> torch.Tensor:
    """w_k = std_k / mean_{j in steps} std_j (std_k = s_k sqrt|dt_k| for "sde"): mean one over the steps trained
    (`steps`; default the first floor(timestep_fraction * T)). With branching only the branch steps are trained
    (CreditMethod.trained_steps), each with the same number of pairs, so the weights average one over the trained
    pairs and leave the objective's overall scale as without them."""
    from ..ops.reference import step_coefficients
    T = sched.steps
    if steps is None:
        steps = list(range(max(1, int(math.floor(cfg.train.timestep_fraction * T)))))
    co = step_coefficients(sched.sigmas, sched.noise_levels, torch.arange(T, device=sched.sigmas.device), 1,
                           cfg.sampling.variant)
    return co.std / co.std[torch.tensor(steps, device=co.std.device)].mean()


def make_credit(cfg, sched) -> CreditMethod:
    m, T = cfg.credit.method, sched.steps
    if m == "sparse":
        return CreditMethod(cfg, sched, SDESampler(), FinalRewardAdvantages(T))
    if m in ("dense", "turning_point"):
        from ..rollout.completions import scored_steps
        from .dense import CompletionSampler, GainAdvantages
        cs, stride = cfg.credit.completion_steps, cfg.credit.score_stride
        starts = scored_steps(T, stride) if stride > 1 else None
        sampler = CompletionSampler(None if cs == "remaining" else int(cs), starts)
        if m == "dense":
            return CreditMethod(cfg, sched, sampler, GainAdvantages(cfg.train.adv_clip, cfg.credit.zero_gain,
                                                                    starts, T, cfg.credit.dense_target,
                                                                    cfg.credit.dense_norm))
        from .turning_point import TurningPointAdvantages
        c = cfg.credit
        return CreditMethod(cfg, sched, sampler, TurningPointAdvantages(
            c.turning_point_constraint, c.turning_point_balance, cfg.train.adv_clip, c.turning_point_rule,
            c.turning_point_balance_missing))
    if m == "branching":
        from .branching import BranchAdvantages, BranchSampler
        sampler = BranchSampler(cfg, sched)
        return CreditMethod(cfg, sched, sampler, BranchAdvantages(sampler))
    raise ValueError(f"credit.method: unknown method {m!r}")
