"""The rollout driver: batching, conditioning, z_0, per-row RNG, host copies, and ONE decode-and-score path.

Per batch of `sampling.sample_batch` rows: the conditioning, z_0 and the per-row SDE noise (keyed by global row),
`sampler(ctx, cond, z0, noise, levels) -> SampledBatch` ((b, T+1, C, h, w) path, (b, T) log-probs, (b, R, C, h, w)
latents to score), then `score(ctx, latents, prompts)`: the b * R decodes and reward calls run in the reward thread
while the next batch samples. Every credit method scores through `score` (branching included).
"""
from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..utils import seeding


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


@dataclass
class SampledBatch:
    latents: torch.Tensor          # (b, T+1, C, h, w) the SDE path
    log_probs: torch.Tensor        # (b, T)
    finals: torch.Tensor           # (b, R, C, h, w) latents to decode and score (R = score columns)
    extra_nfe: int = 0             # network evaluations beyond the path


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


def score(ctx, finals: torch.Tensor, prompts: list[str]) -> Future:
    """The one decode-and-score path: (b, R, C, h, w) latents, b prompts -> Future of ((b * R,) rewards, parts),
    decoded (chunks of model.decode_batch) and scored with their prompts in the reward thread."""
    R = finals.shape[1]
    return ctx.reward.submit(finals.flatten(0, 1), [p for p in prompts for _ in range(R)], decode=ctx.models.decode)


def batched_rollout(ctx, local_ids: torch.Tensor, epoch: int, sampler, desc: str) -> RolloutResult:
    """The rollout of rows local_ids of the epoch: batches of `sampling.sample_batch` rows, each sampled by
    `sampler(ctx, cond, z0, noise, levels) -> SampledBatch` and scored (`score`) while the next batch samples."""
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
        futures.append(score(ctx, out.finals, prompts[sl]))
        decodes += out.finals.shape[0] * R
        extra += out.extra_nfe
        lats.append(out.latents.cpu())
        lps.append(out.log_probs.cpu())
        bar.update(sl.stop - sl.start)
    bar.close()
    return RolloutResult(torch.cat(lats), torch.cat(lps), levels.cpu() if levels.dim() == 2 else levels, mask,
                         futures, R, extra, decodes)
