"""Group-relative advantages (Flow-GRPO) and per-timestep normalisation (DenseGRPO / TP-GRPO)."""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, std_mode: str = "global",
                     clip: float = 5.0, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean_{g(i)} r) / (std + eps), std over the group or over all N rewards; clipped to +-clip.

    rewards (N,) float, group_ids (N,) int -> (N,) float32.
    """
    r = rewards.double()
    out = torch.empty_like(r)
    gstd = r.std(unbiased=False)
    for g in torch.unique(group_ids):
        m = group_ids == g
        std = r[m].std(unbiased=False) if std_mode == "group" else gstd
        out[m] = (r[m] - r[m].mean()) / (std + eps)
    return out.clamp(-clip, clip).float()


def per_timestep_advantages(gains: torch.Tensor, group_ids: torch.Tensor, clip: float = 5.0,
                            eps: float = 1e-4) -> torch.Tensor:
    """A_k^i = (g_k^i - mean_j g_k^j) / (std_j g_k^j + eps) within each group, per step k. gains (N,T) -> (N,T).

    A group whose gains at step k are all equal (std 0) gets A = 0 there (nothing to prefer).
    """
    g = gains.double()
    out = torch.zeros_like(g)
    for gid in torch.unique(group_ids):
        m = group_ids == gid
        x = g[m]
        mu = x.mean(0, keepdim=True)
        sd = x.std(0, unbiased=False, keepdim=True)
        out[m] = torch.where(sd > 0, (x - mu) / (sd + eps), torch.zeros_like(x))
    return out.clamp(-clip, clip).float()
