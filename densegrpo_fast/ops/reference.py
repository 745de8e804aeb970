"""Torch reference for the three ops: `sde_step`, `sde_logprob`, `grpo_loss`. The ground truth for every fast path.

Notation (docs/algorithms.md §1-2): z (B,C,H,W) latent at sigma_k, v velocity, k (B,) int64 step index into the
device tables sigmas (T+1,) and noise_levels (T,); dt = sigma_{k+1} - sigma_k < 0. Both variants have a mean that is
linear in (z, v), so every op is written with per-sample coefficients:

    mu = alpha * z + c * v          z' = mu + std * eps
    sde: s = a_k sqrt(sigma/(1-sigma)) (1 - sigma_1 in the denominator at sigma = 1),
         alpha = 1 + s^2 dt / (2 sigma),  c = dt (1 + s^2 (1 - sigma) / (2 sigma)),  std = s sqrt(|dt|)
    cps: std = sigma' sin(a pi / 2), r = sqrt(sigma'^2 - std^2), alpha = (1 - sigma') + r, c = r (1 - sigma) - (1 - sigma') sigma

    log_prob = red * sum_CHW [ -q (z' - mu)^2 + const ],  q = 1/(2 std^2), const = -log std - log(2 pi)/2
    kl       = red * sum_CHW kl_scale (mu_theta - mu_ref)^2 = red * sum kl_scale c^2 (v - v_ref)^2

red = 1/(C H W) for reduction "mean" (Flow-GRPO's reference) or 1 for "sum" (the true density). With "mean" the KL
uses the reference scaling 1/(2 s_k^2) (no |dt|); with "sum" the true Gaussian KL 1/(2 std^2). CPS with
cps_logprob="reference" uses q = 1, const = 0 as the public code does. A step whose std is 0 (noise level 0: the
Euler ODE step) has log_prob = kl = 0.
All scalar math is fp32 (fp64 when the latent is fp64), whatever the dtype of z and v.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch


class StepCoefficients(NamedTuple):
    alpha: torch.Tensor     # (B,)
    c: torch.Tensor         # (B,)
    std: torch.Tensor       # (B,)
    q: torch.Tensor         # (B,) weight of sum (z'-mu)^2 in log_prob, reduction included (sign: subtracted)
    const: torch.Tensor     # (B,) additive log_prob constant, reduction included
    kl_scale: torch.Tensor  # (B,) weight of sum (v - v_ref)^2 in kl, c^2 and reduction included


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def as_index(k, batch: int, device) -> torch.Tensor:
    """An int or (B,) index -> (B,) int64 on device (no host sync for tensors)."""
    if isinstance(k, torch.Tensor):
        k = k.to(device=device, dtype=torch.long)
        return k.expand(batch) if k.dim() == 0 else k
    return torch.full((batch,), int(k), dtype=torch.long, device=device)


def step_coefficients(sigmas: torch.Tensor, noise_levels: torch.Tensor, k: torch.Tensor, numel: int,
                      variant: str = "sde", reduction: str = "mean", cps_logprob: str = "faithful",
                      dtype: torch.dtype = torch.float32) -> StepCoefficients:
    sig_tab = sigmas.to(dtype)
    sigma, sigma_next = sig_tab[k], sig_tab[k + 1]
    nl = noise_levels.to(dtype)
    a = nl[k] if nl.dim() == 1 else nl.gather(1, k[:, None]).squeeze(1)  # (T,) or per-sample (B,T)
    dt = sigma_next - sigma
    red = 1.0 / numel if reduction == "mean" else 1.0
    if variant == "sde":
        denom = 1.0 - torch.where(sigma == 1.0, sig_tab[1], sigma)
        s = a * torch.sqrt(sigma / denom)
        alpha = 1.0 + s * s * dt / (2.0 * sigma)
        c = dt * (1.0 + s * s * (1.0 - sigma) / (2.0 * sigma))
        std = s * torch.sqrt(-dt)
        kl_std = s if reduction == "mean" else std
        faithful = True
    elif variant == "cps":
        std = sigma_next * torch.sin(a * (math.pi / 2))
        r = torch.sqrt(torch.clamp(sigma_next * sigma_next - std * std, min=0.0))
        alpha = (1.0 - sigma_next) + r
        c = r * (1.0 - sigma) - (1.0 - sigma_next) * sigma
        kl_std = std
        faithful = cps_logprob == "faithful"
    else:
        raise ValueError(f"sampling.variant: unknown SDE variant {variant!r}; choose 'sde' or 'cps'")
    live = std > 0
    safe_std = torch.where(live, std, torch.ones_like(std))
    safe_kl = torch.where(kl_std > 0, kl_std, torch.ones_like(kl_std))
    zero = torch.zeros_like(std)
    if faithful:
        q = torch.where(live, red / (2.0 * safe_std * safe_std), zero)
        const = torch.where(live, (-torch.log(safe_std) - 0.5 * math.log(2 * math.pi)) * (red * numel), zero)
    else:
        q = torch.where(live, torch.full_like(std, red), zero)
        const = zero
    kl_scale = torch.where(kl_std > 0, red * c * c / (2.0 * safe_kl * safe_kl), zero)
    return StepCoefficients(alpha, c, std, q, const, kl_scale)


def _bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.view(-1, *([1] * (like.dim() - 1)))


def sde_step(latent: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, noise_levels: torch.Tensor, k,
             noise: torch.Tensor, variant: str = "sde", reduction: str = "mean", cps_logprob: str = "faithful"):
    """One SDE sampling step. (B,C,H,W) x2, tables, k, noise (B,C,H,W) -> next latent (latent.dtype), log_prob (B,)."""
    B = latent.shape[0]
    dt_ = compute_dtype(latent)
    k = as_index(k, B, latent.device)
    co = step_coefficients(sigmas, noise_levels, k, latent[0].numel(), variant, reduction, cps_logprob, dt_)
    z, v = latent.to(dt_), velocity.to(dt_)
    mean = _bcast(co.alpha, z) * z + _bcast(co.c, z) * v
    nxt = mean + _bcast(co.std, z) * noise.to(dt_)
    nxt_out = nxt.to(latent.dtype)
    diff = nxt_out.to(dt_) - mean  # the log-prob of the stored (rounded) sample
    log_prob = -co.q * diff.pow(2).flatten(1).sum(1) + co.const
    return nxt_out, log_prob


def sde_logprob(latent: torch.Tensor, velocity: torch.Tensor, next_latent: torch.Tensor, sigmas: torch.Tensor,
                noise_levels: torch.Tensor, k, ref_velocity: Optional[torch.Tensor] = None, variant: str = "sde",
                reduction: str = "mean", cps_logprob: str = "faithful"):
    """Log-prob of a stored transition z -> z' under velocity v, and KL to the reference velocity.

    (B,C,H,W) x3 (+ ref_velocity) -> log_prob (B,), kl (B,) (zeros without ref_velocity). Differentiable in v.
    """
    B = latent.shape[0]
    dt_ = compute_dtype(latent)
    k = as_index(k, B, latent.device)
    co = step_coefficients(sigmas, noise_levels, k, latent[0].numel(), variant, reduction, cps_logprob, dt_)
    z, v, zn = latent.to(dt_), velocity.to(dt_), next_latent.to(dt_)
    mean = _bcast(co.alpha, z) * z + _bcast(co.c, z) * v
    log_prob = -co.q * (zn - mean).pow(2).flatten(1).sum(1) + co.const
    if ref_velocity is None:
        kl = torch.zeros_like(log_prob)
    else:
        kl = co.kl_scale * (v - ref_velocity.to(dt_)).pow(2).flatten(1).sum(1)
    return log_prob, kl


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
              weights: Optional[torch.Tensor], clip_range: float, kl: Optional[torch.Tensor] = None,
              beta: float = 0.0):
    """Clipped-ratio GRPO loss over N samples (N,) -> loss, clip fraction, approx KL (scalars).

    rho = exp(logp - logp_old); L = mean_i w_i [max(-A_i rho_i, -A_i clip(rho_i, 1-eps, 1+eps)) + beta kl_i];
    the weight w_i (None = 1) scales both terms, so a zero-weight sample (padding) gets no gradient at all.
    clipfrac = mean |rho - 1| > eps; approx_kl = mean (logp - logp_old)^2 / 2 (over all N, unweighted).
    """
    dt_ = compute_dtype(log_prob)
    lp, old, adv = log_prob.to(dt_), old_log_prob.to(dt_), advantages.to(dt_)
    ratio = torch.exp(lp - old)
    per = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range))
    if kl is not None and beta > 0:
        per = per + beta * kl.to(dt_)
    if weights is not None:
        per = per * weights.to(dt_)
    loss = per.mean()
    with torch.no_grad():
        clipfrac = ((ratio - 1.0).abs() > clip_range).to(dt_).mean()
        approx_kl = 0.5 * ((lp - old) ** 2).mean()
    return loss, clipfrac, approx_kl
