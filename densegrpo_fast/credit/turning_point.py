"""TP-GRPO (turning points) on DenseGRPO's completion rewards Q_0..Q_T (docs/algorithms.md §7).

r_k = Q_T - Q_k at (kept) turning points, d_k = Q_{k+1} - Q_k elsewhere, then DenseGRPO's per-step normalisation.
"""
from __future__ import annotations

import torch

from .advantages import per_timestep_advantages
from .dense import gain_statistics, step_gains


def turning_points(q: torch.Tensor, constraint: bool = True, rule: str = "next") -> torch.Tensor:
    """(N, T+1) -> (N, T) bool. s_k = sign(d_k) sign(Q_T - Q_0). Step k >= 1 turns if s_{k-1} < 0 < s_k and, with
    the constraint, sign(d_k) = sign(Q_T - Q_{k+1}) (rule "next": the reward change after step k, as the public
    TP-GRPO code checks it; the last step is then never eligible) or sign(Q_T - Q_k) (rule "current"); step 0 turns
    if sign(d_0) sign(Q_T - Q_1) > 0."""
    d = step_gains(q)
    qt = q[:, -1:]
    s = torch.sign(d) * torch.sign(qt - q[:, :1])
    tp = torch.zeros_like(d, dtype=torch.bool)
    tp[:, 1:] = (s[:, :-1] < 0) & (s[:, 1:] > 0)
    if constraint:
        ref = q[:, 2:] if rule == "next" else q[:, 1:-1]       # Q_{k+1} or Q_k for k = 1 .. T-1
        tp[:, 1:] &= torch.sign(d[:, 1:]) == torch.sign(qt - ref)
    tp[:, 0] = torch.sign(d[:, 0]) * torch.sign(qt[:, 0] - q[:, 1]) > 0
    return tp


def turning_point_rewards(q: torch.Tensor, constraint: bool = True, balance: bool = True, rule: str = "next",
                          missing: str = "keep"):
    """-> (N, T) step rewards (Q_T - Q_k at kept turning points, d_k elsewhere), the kept turning-point mask.

    Balancing: over the whole batch keep only min(#positive, #negative) turning points of each sign (by the sign of
    Q_T - Q_k), the largest |Q_T - Q_k| first; the others revert to d_k. When one sign has none, `missing` = "keep"
    keeps them all (the public code) or "drop" drops them all.
    """
    d = step_gains(q)
    agg = q[:, -1:] - q[:, :-1]
    tp = turning_points(q, constraint, rule)
    if balance:
        keep = torch.zeros_like(tp)
        pos, neg = tp & (agg > 0), tp & (agg < 0)
        m = int(min(pos.sum(), neg.sum()))
        if m == 0 and missing == "keep":
            return torch.where(tp, agg, d), tp
        for mask in (pos, neg):
            idx = mask.flatten().nonzero().flatten()
            if m and idx.numel():
                top = idx[agg.flatten()[idx].abs().argsort(descending=True)[:m]]
                keep.view(-1)[top] = True
        tp = keep
    return torch.where(tp, agg, d), tp


class TurningPointAdvantages:
    def __init__(self, constraint: bool, balance: bool, clip: float, rule: str = "next", missing: str = "keep"):
        self.constraint, self.balance, self.clip, self.rule, self.missing = constraint, balance, clip, rule, missing

    def __call__(self, scores: torch.Tensor, group_ids: torch.Tensor, tc) -> tuple[torch.Tensor, dict]:
        q = scores.double()
        r, tp = turning_point_rewards(q, self.constraint, self.balance, self.rule, self.missing)
        A = per_timestep_advantages(r, group_ids, self.clip)
        return A, {**gain_statistics(q, A), "turning_point_frac": tp.float().mean().item()}
