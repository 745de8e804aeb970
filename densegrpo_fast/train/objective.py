"""The GRPO objective as plain functions: trained pairs, padding, optimizer windows, the loss, its statistics.

pairs (P, 2) = (trajectory, step) of the trained mask, shuffled, padded with zero-weight repeats to n_micro * mb
(n_micro agreed by the ranks). An optimizer window's gradient is (1 / N_w) sum_i w_i (L_i + beta KL_i) over its N_w
valid pairs on all ranks: each micro-batch loss (a mean over mb pairs) is scaled by mb * world / N_w (DeepSpeed
averages gradients over the ranks).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .. import ops


def distinct_states(state_rows: Optional[torch.Tensor], i: torch.Tensor, k: torch.Tensor):
    """The distinct network inputs of the pairs (i, k): rows r, r' with state_rows[r] == state_rows[r'] hold the same
    latent at step k under the same prompt. -> rows and steps of one pair per state (in order of first appearance)
    and the (M,) state of each pair, or (i, k, None) when no two pairs share a state."""
    if state_rows is None:
        return i, k, None
    seen, first, inv = {}, [], []
    for n, key in enumerate(zip(state_rows[i].tolist(), k.tolist())):
        if key not in seen:
            seen[key] = len(seen)
            first.append(n)
        inv.append(seen[key])
    if len(first) == len(inv):
        return i, k, None
    first = torch.tensor(first, dtype=torch.long)
    return i[first], k[first], torch.tensor(inv, dtype=torch.long)


def state_grouped(pairs: torch.Tensor, state_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """pairs (P, 2) reordered so that pairs sharing a state are consecutive (one micro-batch evaluates the state once):
    states in the order of their first pair, pairs of a state in their order. Unchanged without shared states."""
    if state_rows is None or not pairs.shape[0]:
        return pairs
    _, _, inv = distinct_states(state_rows, pairs[:, 0], pairs[:, 1])
    return pairs if inv is None else pairs[torch.argsort(inv, stable=True)]


def select_pairs(train_mask: Optional[torch.Tensor], advantages: torch.Tensor, n_train_steps: int,
                 drop_zero_advantage: bool, generator: torch.Generator,
                 state_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The trained (trajectory, step) pairs (P, 2): the steps k < n_train_steps of the (n, T) train mask (None =
    all), without zero advantages when asked, in the order of a permutation drawn from `generator`, pairs of one
    shared state (state_rows) side by side. advantages (n, T)."""
    n = advantages.shape[0]
    mask = train_mask[:, :n_train_steps] if train_mask is not None else \
        torch.ones(n, n_train_steps, dtype=torch.bool)
    mask = mask.clone()
    if drop_zero_advantage:
        mask &= advantages[:, :n_train_steps] != 0
    pairs = mask.nonzero()
    pairs = pairs[torch.randperm(pairs.shape[0], generator=generator)]
    return state_grouped(pairs, state_rows)


def micro_steps(n_pairs: int, mb: int) -> int:
    """This rank's micro-steps for n_pairs pairs (the ranks then agree on the largest, at least 1)."""
    return math.ceil(n_pairs / mb)


def pad_pairs(pairs: torch.Tensor, n_micro: int, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pairs (P, 2), P <= n_micro * mb -> (n_micro * mb, 2) pairs and the (n_micro * mb,) valid mask: padded with
    repeats of the first pair (zeros without pairs), invalid, so every rank runs the same micro-steps."""
    valid = torch.ones(n_micro * mb, dtype=torch.bool)
    if pairs.shape[0] < n_micro * mb:
        pad = n_micro * mb - pairs.shape[0]
        filler = pairs[:1].expand(pad, 2) if pairs.shape[0] else torch.zeros(pad, 2, dtype=torch.long)
        valid[pairs.shape[0]:] = False
        pairs = torch.cat([pairs, filler])
    return pairs, valid


def optimizer_windows(valid: torch.Tensor, mb: int, optimizer_steps: int) -> tuple[int, torch.Tensor]:
    """valid (n_micro * mb,) -> micro-steps per optimizer window (n_micro split into `optimizer_steps` windows, the
    last possibly shorter) and the (n_windows,) valid pairs of each window on this rank (the ranks sum them)."""
    n_micro = valid.numel() // mb
    window = math.ceil(n_micro / optimizer_steps)
    n_windows = math.ceil(n_micro / window)
    return window, torch.stack([valid[w * window * mb:(w + 1) * window * mb].sum() for w in range(n_windows)])


def is_boundary(m: int, n_micro: int, window: int) -> bool:
    """Micro-step m is the last of its optimizer window (the optimizer steps after it)."""
    return m == min(n_micro, (m // window + 1) * window) - 1


def window_scale(mb: int, world: int, n_valid) -> float:
    """The factor of a micro-batch loss (mean over mb pairs) in a window of n_valid valid pairs on all ranks."""
    return mb * world / max(1.0, float(n_valid))


def pair_loss(lp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, ok: torch.Tensor, k: torch.Tensor,
              step_weights: Optional[torch.Tensor], clip_range: float, kl: torch.Tensor, beta_kl: float):
    """The micro-batch loss: ops.grpo_loss of M pairs with weight w_i = valid_i * step_weights[k_i] (TempFlow-GRPO's
    noise-aware weights; None = 1), which scales the pair's whole objective (KL term included). All (M,)."""
    dev = lp.device
    w = ok.to(dev).float() * (step_weights[k.to(dev)] if step_weights is not None else 1.0)
    loss, _, _ = ops.grpo_loss(lp, old, advantages, w, clip_range, kl, beta_kl)
    return loss


class LossStatistics:
    """Per-epoch statistics of the micro-batches, accumulated on the device (no host copy per micro-step): sums over
    valid pairs of the loss, KL, clipped ratios (|rho - 1| > clip_range) and approx KL ((log rho)^2 / 2), the valid
    count, the KL per step, and the first micro-batch's max |rho - 1| (before any optimizer step: must be 0)."""

    def __init__(self, steps: int, mb: int, clip_range: float, device):
        self.mb, self.clip_range = mb, clip_range
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.kl_per_step = torch.zeros(steps, dtype=torch.float64, device=device)
        self.kl_count = torch.zeros(steps, dtype=torch.float64, device=device)
        self.ratio_dev_first = torch.zeros((), dtype=torch.float64, device=device)
        self.added = 0

    @torch.no_grad()
    def add(self, loss: torch.Tensor, lp: torch.Tensor, old: torch.Tensor, kl: torch.Tensor, ok: torch.Tensor,
            k: torch.Tensor) -> None:
        """One micro-batch: its loss (a mean over mb pairs, padding weighted 0), (M,) log-probs, old log-probs, KL,
        valid mask and steps."""
        dev = self.sums.device
        okf = ok.to(dev, torch.float64)
        d = (lp.detach() - old).double()
        ratio_dev = (d.exp() - 1.0).abs() * okf
        if self.added == 0:
            self.ratio_dev_first = ratio_dev.max()
        kl_d = kl.detach().double()
        self.sums += torch.stack([loss.detach().double() * self.mb, (kl_d * okf).sum(),
                                  ((ratio_dev > self.clip_range).double() * okf).sum(), (0.5 * d * d * okf).sum(),
                                  okf.sum()])
        kd = k.to(dev)
        self.kl_per_step.index_add_(0, kd, kl_d * okf)
        self.kl_count.index_add_(0, kd, okf)
        self.added += 1

    def metrics(self, total_pairs: int, reduce: Callable = lambda t: t, agree_max: Callable = float) -> dict:
        """Means over the valid pairs (of all ranks: `reduce` sums a tensor over them, `agree_max` takes the largest
        float) -> loss, kl, clipfrac, approx_kl, ratio_dev_first, trained_fraction (valid pairs / total_pairs),
        kl_per_step (T,)."""
        sums, kl_per_step, kl_count = (reduce(t).cpu() for t in (self.sums, self.kl_per_step, self.kl_count))
        n = max(1.0, float(sums[4]))
        return {
            "loss": float(sums[0]) / n, "kl": float(sums[1]) / n, "clipfrac": float(sums[2]) / n,
            "approx_kl": float(sums[3]) / n, "ratio_dev_first": agree_max(float(self.ratio_dev_first)),
            "trained_fraction": float(sums[4]) / max(1, total_pairs),
            "kl_per_step": (kl_per_step / kl_count.clamp(min=1)).tolist(),
        }
