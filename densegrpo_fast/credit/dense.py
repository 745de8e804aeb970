"""DenseGRPO and TP-GRPO: completion rewards Q_0..Q_T of every intermediate latent, per-step credit.

Q_k = R(decode(ODE(z_k: sigma_k -> 0))) for k < T, Q_T = R(decode(z_T)). Gains g_k = Q_{k+1} - Q_k telescope:
sum_k g_k = Q_T - Q_0.
dense          A_k^i = (g_k^i - mean_j g_k^j) / std_j g_k^j within each prompt's group, per step k (clip +-5).
turning_point  TP-GRPO: r_k = Q_T - Q_k at turning points, g_k elsewhere, then the same per-step normalisation.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import RolloutResult, SparseCredit, batches, draw_noise, sde_noise
from .advantages import per_timestep_advantages


def step_gains(q: torch.Tensor) -> torch.Tensor:
    """(N, T+1) completion rewards -> (N, T) gains g_k = Q_{k+1} - Q_k."""
    return q[:, 1:] - q[:, :-1]


def turning_points(q: torch.Tensor, constraint: bool = True) -> torch.Tensor:
    """(N, T+1) -> (N, T) bool. s_k = sign(d_k) sign(Q_T - Q_0). Step k >= 1 turns if s_{k-1} < 0 < s_k (and, with
    the constraint, sign(d_k) = sign(Q_T - Q_k)); step 0 turns if sign(d_0) sign(Q_T - Q_1) > 0."""
    d = step_gains(q)
    qt = q[:, -1:]
    s = torch.sign(d) * torch.sign(qt - q[:, :1])
    tp = torch.zeros_like(d, dtype=torch.bool)
    tp[:, 1:] = (s[:, :-1] < 0) & (s[:, 1:] > 0)
    if constraint:
        tp[:, 1:] &= torch.sign(d[:, 1:]) == torch.sign(qt - q[:, 1:-1])
    tp[:, 0] = torch.sign(d[:, 0]) * torch.sign(qt[:, 0] - q[:, 1]) > 0
    return tp


def turning_point_rewards(q: torch.Tensor, constraint: bool = True, balance: bool = True):
    """-> (N, T) step rewards (Q_T - Q_k at kept turning points, d_k elsewhere), the kept turning-point mask.

    Balancing: over the whole batch keep only min(#positive, #negative) turning points of each sign (by the sign of
    Q_T - Q_k), the largest |Q_T - Q_k| first; the others revert to d_k.
    """
    d = step_gains(q)
    agg = q[:, -1:] - q[:, :-1]
    tp = turning_points(q, constraint)
    if balance:
        keep = torch.zeros_like(tp)
        pos, neg = tp & (agg > 0), tp & (agg < 0)
        m = int(min(pos.sum(), neg.sum()))
        for mask in (pos, neg):
            idx = mask.flatten().nonzero().flatten()
            if m and idx.numel():
                top = idx[agg.flatten()[idx].abs().argsort(descending=True)[:m]]
                keep.view(-1)[top] = True
        tp = keep
    return torch.where(tp, agg, d), tp


class DenseCredit(SparseCredit):
    """DenseGRPO (method "dense") and TP-GRPO (method "turning_point") on the staircase completion engine."""

    def __init__(self, cfg, sched):
        super().__init__(cfg, sched)
        cs = cfg.credit.completion_steps
        self.n: Optional[int] = None if cs == "remaining" else int(cs)

    def rollout(self, trainer, velocity, local_ids: torch.Tensor, epoch: int) -> RolloutResult:
        from ..rollout.completions import dense_rollout
        cfg, sc = self.cfg, self.cfg.sampling
        levels, mask = self.window_levels(trainer, epoch, local_ids)
        prompts = [trainer.train_prompts[i] for i in local_ids.tolist()]
        lats, lps, futures, decodes, extra = [], [], [], 0, 0
        T = self.sched.steps
        bar = trainer._bar(len(prompts), f"rollout+completions {epoch}")
        for b, sl in batches(len(prompts), sc.sample_batch):
            n = sl.stop - sl.start
            cond = trainer.conditioning(prompts[sl])
            lv = levels[sl] if levels.dim() == 2 else levels
            dr = dense_rollout(velocity, cond, draw_noise(trainer, epoch, sl), self.sched.sigmas, lv,
                               sde_noise(trainer, epoch, sl), self.n, sc.variant,
                               sc.logprob_reduction, sc.cps_logprob, cfg.credit.max_completion_batch)
            extra += dr.new_nfe
            finals = torch.cat([dr.completions, dr.trajectory.latents[:, -1:]], 1)   # (n, T+1, ...) Q_0..Q_T
            futures.append(trainer.reward.pool.submit(_decode_and_score, trainer, finals, prompts[sl]))
            decodes += n * (T + 1)
            lats.append(dr.trajectory.latents.cpu())
            lps.append(dr.trajectory.log_probs.cpu())
            bar.update(n)
        bar.close()
        return RolloutResult(torch.cat(lats), torch.cat(lps), levels.cpu() if levels.dim() == 2 else levels, mask,
                             futures, T + 1, extra, decodes)

    def advantages(self, scores: torch.Tensor, group_ids: torch.Tensor, tc) -> tuple[torch.Tensor, dict]:
        q = scores.double()
        if self.cfg.credit.method == "turning_point":
            r, tp = turning_point_rewards(q, self.cfg.credit.turning_point_constraint,
                                          self.cfg.credit.turning_point_balance)
        else:
            r, tp = step_gains(q), None
        A = per_timestep_advantages(r, group_ids, tc.adv_clip)
        g = step_gains(q)
        stats = {"gain_mean": g.mean(0).tolist(), "gain_std": g.std(0).tolist(),
                 "gain_pos_frac": (g > 0).float().mean(0).tolist(), "q0_mean": q[:, 0].mean().item(),
                 "adv_abs_mean": A.abs().mean().item(), "adv_zero_frac": (A == 0).float().mean().item()}
        if tp is not None:
            stats["turning_point_frac"] = tp.float().mean().item()
        return A, stats


def _decode_and_score(trainer, finals: torch.Tensor, prompts: list[str]):
    """In the reward thread: decode the (n, T+1) completed latents (in chunks of model.decode_batch) and score them."""
    n, R = finals.shape[:2]
    images = trainer.models.decode(finals.flatten(0, 1))
    rewards, parts = trainer.reward(images, [p for p in prompts for _ in range(R)])
    return rewards, parts


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
