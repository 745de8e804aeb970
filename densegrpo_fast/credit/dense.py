"""DenseGRPO: completion rewards Q_0..Q_T of every intermediate latent, per-step credit (docs/algorithms.md §5).

Q_k = R(decode(ODE(z_k: sigma_k -> 0))) for k < T, Q_T = R(decode(z_T)). Gains g_k = Q_{k+1} - Q_k telescope:
sum_k g_k = Q_T - Q_0. A_k^i = (g_k^i - mean_j g_k^j) / std_j g_k^j within each prompt's group, per step k (clip).
credit.score_stride = s scores only Q_0, Q_s, Q_2s, ..., Q_T: every step k of the segment [k_a, k_b) gets the
segment's gain Q_{k_b} - Q_{k_a} (fewer completions and decodes, coarser credit).
The sampler is shared with TP-GRPO (credit/turning_point.py), which scores the same Q differently.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..rollout.driver import SampledBatch
from .advantages import per_timestep_advantages


def step_gains(q: torch.Tensor) -> torch.Tensor:
    """(N, T+1) completion rewards -> (N, T) gains g_k = Q_{k+1} - Q_k."""
    return q[:, 1:] - q[:, :-1]


def segment_gains(q: torch.Tensor, starts: list[int], T: int) -> torch.Tensor:
    """(N, K+1) rewards Q at starts k_0 = 0 < k_1 < ... < k_{K-1} and at T -> (N, T) per-step gains: step k in
    [k_a, k_{a+1}) (k_K = T) gets Q_{k_{a+1}} - Q_{k_a}. starts = 0..T-1 is step_gains."""
    seg = step_gains(q)                                          # (N, K)
    edges = torch.tensor(list(starts)[1:] + [T])
    which = torch.bucketize(torch.arange(T), edges, right=True)  # segment of each step
    return seg[:, which]


def reward_to_go(q: torch.Tensor, starts: Optional[list[int]] = None, T: Optional[int] = None) -> torch.Tensor:
    """(N, K+1) rewards Q at the scored steps and at T -> (N, T): step k gets Q_T - Q_{k_a}, k_a the scored step
    that starts its segment (every step scored: Q_T - Q_k)."""
    tg = q[:, -1:] - q[:, :-1]                                   # (N, K)
    if starts is None:
        return tg
    edges = torch.tensor(list(starts)[1:] + [T])
    return tg[:, torch.bucketize(torch.arange(T), edges, right=True)]


def global_std_advantages(x: torch.Tensor, group_ids: torch.Tensor, clip: float = 5.0,
                          eps: float = 1e-4) -> torch.Tensor:
    """credit.dense_norm = "global": x (N, T) centred within each group per step, divided by the std of all the
    centred values (one scale for every step, so a step whose signals barely differ keeps small advantages)."""
    x = x.double()
    c = torch.empty_like(x)
    for gid in torch.unique(group_ids):
        m = group_ids == gid
        c[m] = x[m] - x[m].mean(0, keepdim=True)
    sd = c.pow(2).mean().sqrt()
    out = c / (sd + eps) if sd > 0 else torch.zeros_like(c)
    return out.clamp(-clip, clip).float()


class CompletionSampler:
    """The SDE rollout with the ODE completion of every z_k on the staircase engine; scores Q_0..Q_T (R = T+1).
    n: completion steps (None = the remaining schedule)."""
    desc = "rollout+completions"

    def __init__(self, n: Optional[int] = None, starts: Optional[list[int]] = None):
        self.n, self.starts = n, starts

    def __call__(self, ctx, cond, z0, noise, levels) -> SampledBatch:
        from ..rollout.completions import dense_rollout
        sc = ctx.cfg.sampling
        dr = dense_rollout(ctx.velocity, cond, z0, ctx.sched.sigmas, levels, noise, self.n, sc.variant,
                           sc.logprob_reduction, sc.cps_logprob, ctx.cfg.credit.max_completion_batch,
                           starts=self.starts)
        finals = torch.cat([dr.completions, dr.trajectory.latents[:, -1:]], 1)   # (b, K+1, ...) Q at starts, Q_T
        return SampledBatch(dr.trajectory.latents, dr.trajectory.log_probs, finals, dr.new_nfe)


def gain_statistics(q: torch.Tensor, A: torch.Tensor, g: Optional[torch.Tensor] = None) -> dict:
    g = step_gains(q) if g is None else g
    return {"gain_mean": g.mean(0).tolist(), "gain_std": g.std(0).tolist(),
            "gain_pos_frac": (g > 0).float().mean(0).tolist(), "q0_mean": q[:, 0].mean().item(),
            "adv_abs_mean": A.abs().mean().item(), "adv_zero_frac": (A == 0).float().mean().item()}


class GainAdvantages:
    """DenseGRPO: per-step group normalisation of the gains. zero_gain "normalise" (the paper's formula) treats an
    exact-zero gain like any value (gains [0, 0.5, 0] -> A = [-0.71, 1.41, -0.71]); "zero" gives it advantage 0
    (a step that changed nothing is not credited either way). starts/T: the scored steps (credit.score_stride;
    None = every step), scores (N, K+1). target (credit.dense_target): "gain" (the paper) or "to_go" (Q_T - Q_k);
    norm (credit.dense_norm): "group_step" (the paper) or "global" (global_std_advantages)."""

    def __init__(self, clip: float, zero_gain: str = "normalise", starts: Optional[list[int]] = None,
                 T: Optional[int] = None, target: str = "gain", norm: str = "group_step"):
        self.clip, self.zero_gain, self.starts, self.T = clip, zero_gain, starts, T
        self.target, self.norm = target, norm

    def __call__(self, scores: torch.Tensor, group_ids: torch.Tensor, tc) -> tuple[torch.Tensor, dict]:
        q = scores.double()
        g = step_gains(q) if self.starts is None else segment_gains(q, self.starts, self.T)
        x = g if self.target == "gain" else reward_to_go(q, self.starts, self.T)
        A = (per_timestep_advantages(x, group_ids, self.clip) if self.norm == "group_step"
             else global_std_advantages(x, group_ids, self.clip))
        if self.zero_gain == "zero":
            A = torch.where(x == 0, torch.zeros_like(A), A)
        return A, gain_statistics(q, A, g)


def plot_dense_rewards(rows: list[dict], path: str) -> bool:
    """PNG of the dense rewards per timestep over a run: gain mean +- std per step k (one line per epoch, late
    epochs darker) and the fraction of positive gains per step. rows: metrics.jsonl lines. -> False without gains."""
    rows = [r for r in rows if "gain_mean" in r]
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    n = len(rows)
    for i, r in enumerate(rows):
        k = list(range(len(r["gain_mean"])))
        c = plt.cm.viridis(i / max(1, n - 1))
        ax[0].errorbar(k, r["gain_mean"], yerr=r["gain_std"], color=c, alpha=0.7, capsize=2,
                       label=f"epoch {r['epoch']}" if i in (0, n - 1) else None)
        ax[1].plot(k, r["gain_pos_frac"], "o-", color=c, alpha=0.7)
    ax[0].axhline(0, color="gray", lw=0.5)
    ax[0].set(xlabel="step k", ylabel="gain g_k = Q_{k+1} - Q_k", title="dense reward per timestep")
    ax[0].legend(fontsize=8)
    ax[1].axhline(0.5, color="gray", lw=0.5)
    ax[1].set(xlabel="step k", ylabel="fraction g_k > 0", title="sign balance per timestep")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
