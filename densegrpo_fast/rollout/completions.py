"""The completion engine: ODE completions of every intermediate latent of an SDE rollout, staircase-batched.

For trajectory i and start step k, a completion runs Euler from z_k over a sub-schedule sigma_k = s_0 > ... > s_n = 0
(n = "remaining": the rest of the rollout schedule; n fixed: n+1 points of the remaining schedule evenly spaced in
index, so n = 1 is the one-shot x0 prediction z_k - sigma_k v_k). Its first step reuses the SDE step's own velocity
v(z_k, sigma_k), so it costs n - 1 new network evaluations.

Staircase (docs/algorithms.md §8): at solver index j ONE batched forward evaluates the SDE path at z_j and every active
completion (each at its own sigma: the transformer takes per-sample timesteps). With n = remaining the batch at j is
B (1 + j) and a trajectory costs T (T - 1) / 2 new forwards instead of T (T + 1) / 2; each j has a fixed shape
(capturable as a CUDA graph). `max_batch` caps the network batch of one call (a memory cap: larger batches are
split into chunks). `starts` restricts the completions to a subset of start steps (credit.score_stride: every s-th
step), which removes their forwards and decodes.

A deterministic step k (noise level 0, or the ODE main path) makes z_{k+1} the completion's own first Euler step from
z_k; where the rest of k's sub-schedule is k+1's, the completion from z_k IS the completion from z_{k+1} (and, at
k = T-1, z_T itself). Such a completion is not run: it is taken from the first step m >= k whose completion is
(`completion_origins`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import ops
from ..utils.seeding import draw
from ..models.base import Cond
from .sampler import Trajectory


def completion_schedule(sigmas: torch.Tensor, k: int, n: Optional[int]) -> list[int]:
    """Indices into `sigmas` of the completion from step k: k = i_0 < ... < i_m = T. n None = remaining."""
    T = sigmas.numel() - 1
    if n is None or n >= T - k:
        return list(range(k, T + 1))
    pts = torch.linspace(k, T, n + 1).round().long().tolist()
    return sorted(set(pts))


def completion_origins(sigmas: torch.Tensor, noise_levels: torch.Tensor, starts: list[int],
                       completion_steps: Optional[int] = None, sde: bool = True) -> dict[int, int]:
    """start step k -> the step m >= k whose completion equals k's: step j < m is deterministic for every row (level
    0, or sde=False) and its sub-schedule continues as j+1's (always with n = remaining); m = T: the completion is
    z_T. noise_levels (T,) or (B, T); one host copy."""
    T = sigmas.numel() - 1
    lv = noise_levels.detach().cpu()
    zero = [not sde or bool((lv[..., j] == 0).all()) for j in range(T)]
    sched = [completion_schedule(sigmas, j, completion_steps) for j in range(T)] + [[T]]
    out = {}
    for k in starts:
        m = k
        while m < T and zero[m] and sched[m][1:] == sched[m + 1]:
            m += 1
        out[k] = m
    return out


def scored_steps(T: int, stride: int = 1) -> list[int]:
    """Start steps of the completions for credit.score_stride = s: k = 0, s, 2s, ... < T (s = 1: every step)."""
    return list(range(0, T, max(1, int(stride))))


@dataclass
class DenseRollout:
    trajectory: Trajectory
    completions: torch.Tensor   # (B, K, C, h, w) fp32: the completed x0 from each z_k, k in starts (K = T: all)
    new_nfe: int                # network evaluations beyond the SDE path (per sample, CFG counted)
    forwards: list              # network batch per solver index j (the staircase), CFG not counted


@torch.no_grad()
def dense_rollout(velocity, cond: Cond, z0: torch.Tensor, sigmas: torch.Tensor,
                  noise_levels: torch.Tensor, noise, completion_steps: Optional[int] = None,
                  variant: str = "sde", reduction: str = "mean", cps_logprob: str = "faithful",
                  max_batch: int = 0, sde: bool = True, starts: Optional[list[int]] = None) -> DenseRollout:
    """SDE rollout of B trajectories plus the ODE completion of z_k for every k in `starts` (None = 0..T-1), in
    staircase batches.

    velocity: a GuidedVelocity (counts NFEs); noise_levels (T,) or (B,T); noise: a RowNoise or a torch.Generator
    for the SDE steps (see sampler.sde_rollout); sde=False runs the main path as an ODE.
    Completions are kept as one (B, ...) tensor per start step k (all B rows share k's sub-schedule).
    """
    T = sigmas.numel() - 1
    B = z0.shape[0]
    dev = z0.device
    fdt = torch.float64 if z0.dtype == torch.float64 else torch.float32  # fp64 for the exactness tests
    sig = sigmas.to(fdt)
    z = z0.to(fdt)
    lats, lps = [z], []
    starts = list(range(T)) if starts is None else list(starts)
    origin = completion_origins(sig, noise_levels, starts, completion_steps, sde)   # k -> the completion it equals
    run = sorted({m for m in origin.values() if m < T})                            # the completions actually run
    slot = {k: i for i, k in enumerate(run)}
    comps = torch.empty(B, len(run), *z0.shape[1:], dtype=fdt, device=dev)
    sched = [completion_schedule(sig, k, completion_steps) for k in range(T)]
    active: dict[int, list] = {}   # start step k -> [x (B, ...), position in sched[k]]
    rows = torch.arange(B, device=dev)
    nfe_before = velocity.nfe
    forwards = []
    for j in range(T):
        # ---- one staircase batch: the path at sigma_j + every active completion at its own sigma
        ks = list(active)
        x = torch.cat([z] + [active[k][0] for k in ks])
        t_idx = torch.tensor([j] + [sched[k][active[k][1]] for k in ks], device=dev).repeat_interleave(B)
        forwards.append(x.shape[0])
        v = _chunked(velocity, x, sig[t_idx], cond.index(rows.repeat(1 + len(ks))), max_batch)
        v_path = v[:B]
        # ---- advance each active completion one Euler step on its own schedule; retire the finished ones
        for g, k in enumerate(ks, start=1):
            xk, pos = active[k]
            a, b = sched[k][pos], sched[k][pos + 1]
            active[k] = [xk + v[g * B:(g + 1) * B] * (sig[b] - sig[a]), pos + 1]
        # ---- start the completion from z_j (a scored step), reusing the path's velocity for its first step
        if j in slot:
            a, b = sched[j][0], sched[j][1]
            active[j] = [z + v_path * (sig[b] - sig[a]), 1]
        for k in list(active):
            if active[k][1] == len(sched[k]) - 1:
                comps[:, slot[k]] = active.pop(k)[0]
        # ---- the SDE (or ODE) step of the main path
        kk = torch.full((B,), j, dtype=torch.long, device=dev)
        if sde:
            eps = draw(noise, z.shape, dev).to(fdt)
            z, lp = ops.sde_step(z, v_path, sigmas, noise_levels, kk, eps, variant, reduction, cps_logprob)
        else:
            z, lp = z + v_path * (sig[j + 1] - sig[j]), torch.zeros(B, device=dev)
        lats.append(z)
        lps.append(lp)
    traj = Trajectory(torch.stack(lats, 1), torch.stack(lps, 1))
    path_nfe = B * T * (2 if velocity.cfg else 1)
    if run != starts:  # the completions not run are copies: of a later one, or of z_T
        z_T = lats[-1][:, None]
        comps = torch.cat([comps[:, slot[origin[k]]:slot[origin[k]] + 1] if origin[k] < T else z_T for k in starts], 1)
    return DenseRollout(traj, comps, velocity.nfe - nfe_before - path_nfe, forwards)


def _chunked(velocity, x, t, cond: Cond, max_batch: int):
    if max_batch <= 0 or x.shape[0] <= max_batch:
        return velocity(x, t, cond)
    out = [velocity(x[s:s + max_batch], t[s:s + max_batch], cond.index(slice(s, s + max_batch)))
           for s in range(0, x.shape[0], max_batch)]
    return torch.cat(out)


@torch.no_grad()
def naive_completions(velocity, cond: Cond, latents: torch.Tensor, sigmas: torch.Tensor,
                      completion_steps: Optional[int] = None, starts: Optional[list[int]] = None) -> torch.Tensor:
    """Reference: for each k in starts (None = all) separately, Euler from z_k over its schedule, one forward per
    step (no batching, no reuse). latents (B, T+1, ...) -> (B, K, ...). What the staircase must equal."""
    T = sigmas.numel() - 1
    B = latents.shape[0]
    starts = list(range(T)) if starts is None else list(starts)
    out = torch.empty(B, len(starts), *latents.shape[2:], dtype=latents.dtype, device=latents.device)
    for i, k in enumerate(starts):
        x = latents[:, k]
        idx = completion_schedule(sigmas, k, completion_steps)
        for a, b in zip(idx[:-1], idx[1:]):
            v = velocity(x, sigmas[a].expand(B), cond)
            x = x + v.to(x.dtype) * (sigmas[b] - sigmas[a])
        out[:, i] = x
    return out
