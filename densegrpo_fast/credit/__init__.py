"""Credit assignment: how trajectories are sampled and scored, and how scores become per-step advantages.

A credit method is a composition (`CreditMethod`) of
  a sampler  — how one batch is sampled and which latents are scored (`SDESampler`, `CompletionSampler`) run by the
               one rollout driver (`batched_rollout`: conditioning, initial noise, per-row RNG, device->host copies,
               decode + reward submission in the reward thread), or a sampler with its own row layout
               (`BranchSampler`);
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
    futures: list = field(default_factory=list)  # per batch: Future of (rewards (b * R,), parts)
    score_cols: int = 1
    completion_nfe: int = 0        # network evaluations spent on completions/branches (already in the NFE count)
    decodes: int = 0
    row_order: Optional[torch.Tensor] = None  # the row of each returned score, when chunks are not in row order
    # (n,): rows with equal values hold the same latent and prompt at every step both train (TempFlow-GRPO's K
    # branches of one z_k); training evaluates such a state once. None = no sharing.
    state_rows: Optional[torch.Tensor] = None

    def component_scores(self) -> dict:
        """Each reward component's raw scores of the final images (the last score column): name -> (n,)."""
        parts = [f.result()[1] for f in self.futures]
        return {k: torch.cat([p[k] for p in parts]).view(-1, self.score_cols)[:, -1] for k in (parts[0] if parts
                                                                                                else {})}

    def wait_rewards(self) -> torch.Tensor:
        """-> (n, R) scores; re-raises a reward failure with its message."""
        vals = torch.cat([f.result()[0] for f in self.futures]).view(-1, self.score_cols)
        if self.row_order is not None:
            out = torch.empty_like(vals)
            out[self.row_order] = vals
            return out
        return vals


def batches(n: int, size: int):
    for b, s in enumerate(range(0, n, size)):
        yield b, slice(s, min(s + size, n))


def window_levels(ctx, epoch: int, local_ids: torch.Tensor):
    """Flow-GRPO-Fast: one window of `credit.window` SDE steps per prompt group, ODE (a = 0) elsewhere.
    -> per-row noise levels (n, T) and the trained mask, or the schedule's levels and None without a window."""
    T, W = ctx.sched.steps, ctx.cfg.credit.window
    if W <= 0:
        return ctx.sched.noise_levels, None
    n = local_ids.numel()
    G = ctx.cfg.train.group_size
    first = ctx.rank * n
    g = seeding.generator("cpu", ctx.seed, epoch, seeding.TAG_WINDOW)
    n_groups = math.ceil(ctx.n_global / G)
    hi = max(1, ctx.n_train_steps - W + 1)
    starts = torch.randint(0, hi, (n_groups,), generator=g)[(first + torch.arange(n)) // G]
    steps = torch.arange(T)
    mask = (steps[None] >= starts[:, None]) & (steps[None] < starts[:, None] + W)
    levels = ctx.sched.noise_levels.cpu()[None].expand(n, T) * mask
    return levels.to(ctx.device), mask


def decode_and_score(ctx, finals: torch.Tensor, prompts: list[str]):
    """In the reward thread: decode (n, R) latents (chunks of model.decode_batch) and score each with its prompt."""
    n, R = finals.shape[:2]
    images = ctx.models.decode(finals.flatten(0, 1))
    return ctx.reward(images, [p for p in prompts for _ in range(R)])


@dataclass
class SampledBatch:
    latents: torch.Tensor          # (b, T+1, C, h, w) the SDE path
    log_probs: torch.Tensor        # (b, T)
    finals: torch.Tensor           # (b, R, C, h, w) latents to decode and score (R = score columns)
    extra_nfe: int = 0             # network evaluations beyond the path


def batched_rollout(ctx, local_ids: torch.Tensor, epoch: int, sampler, desc: str) -> RolloutResult:
    """The rollout driver: batches of `sampling.sample_batch` rows; per batch the conditioning, z_0 and the per-row
    SDE noise (keyed by global row), `sampler(ctx, cond, z0, noise, levels) -> SampledBatch`, then the batch's
    decodes and reward calls in the reward thread while the next batch samples."""
    sc = ctx.cfg.sampling
    levels, mask = window_levels(ctx, epoch, local_ids)
    prompts = [ctx.prompts[i] for i in local_ids.tolist()]
    lats, lps, futures, decodes, extra, R = [], [], [], 0, 0, 1
    bar = ctx.progress(len(prompts), f"{desc} {epoch}")
    for _, sl in batches(len(prompts), sc.sample_batch):
        rows = ctx.global_rows(sl)
        lv = levels[sl] if levels.dim() == 2 else levels
        out = sampler(ctx, ctx.conditioning(prompts[sl]), ctx.initial_noise(epoch, rows),
                      ctx.noise(epoch, rows, seeding.TAG_SDE_NOISE), lv)
        R = out.finals.shape[1]
        futures.append(ctx.reward.pool.submit(decode_and_score, ctx, out.finals, prompts[sl]))
        decodes += out.finals.shape[0] * R
        extra += out.extra_nfe
        lats.append(out.latents.cpu())
        lps.append(out.log_probs.cpu())
        bar.update(sl.stop - sl.start)
    bar.close()
    return RolloutResult(torch.cat(lats), torch.cat(lps), levels.cpu() if levels.dim() == 2 else levels, mask,
                         futures, R, extra, decodes)


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
