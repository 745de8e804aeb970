"""Dispatch for the fused ops `sde_step`, `sde_logprob`, `grpo_loss`.

Backends: "torch" (ops/reference.py), "cpp" (csrc/sde_ops.cpp, OpenMP, CPU tensors), "triton" (kernels/, CUDA,
or CPU under TRITON_INTERPRET=1), "cuda" (csrc/sde_ops_kernels.cu). "auto": CUDA tensors -> triton, CPU -> cpp when
the extension is built, else torch. `ops.backend` in the config or DENSEGRPO_OPS_BACKEND forces one.
The fast backends compute only the per-sample reductions over C*H*W and the velocity gradient; the per-sample
scalar math (reference.step_coefficients) is shared, so every backend has the same formulas.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from . import reference
from .reference import as_index, compute_dtype, step_coefficients

_BACKEND = os.environ.get("DENSEGRPO_OPS_BACKEND", "auto")
_VALID = ("auto", "torch", "cpp", "triton", "cuda")


def _load_cpp():
    try:
        from densegrpo_fast import _C  # noqa: F401
        return _C
    except Exception:
        return None


def _load_cuda():
    try:
        from densegrpo_fast import _C_cuda  # noqa: F401
        return _C_cuda
    except Exception:
        return None


def _load_triton():
    try:
        from densegrpo_fast import kernels
        return kernels
    except Exception as exc:  # triton missing or broken
        warnings.warn(f"densegrpo_fast: Triton kernels unavailable ({exc})")
        return None


_MODULES: dict = {}
_COEF_CACHE: dict = {}


def _coefficients(sigmas, noise_levels, k, numel, variant, reduction, cps_logprob, dtype):
    """step_coefficients for a (B,) index, gathered from a per-step table computed once per schedule.

    The table (T rows) is cached on the identity and version of the two schedule tensors: ~60 tiny torch ops
    (0.19 ms on the CPU at B=32) become 6 gathers. Per-sample (B,T) noise levels are computed directly.
    """
    if noise_levels.dim() != 1:
        return step_coefficients(sigmas, noise_levels, k, numel, variant, reduction, cps_logprob, dtype)
    key = (id(sigmas), sigmas._version, id(noise_levels), noise_levels._version, sigmas.device, numel, variant,
           reduction, cps_logprob, dtype)
    tab = _COEF_CACHE.get(key)
    if tab is None:
        if len(_COEF_CACHE) > 64:
            _COEF_CACHE.clear()
        steps = torch.arange(noise_levels.numel(), device=sigmas.device)
        tab = torch.stack(step_coefficients(sigmas, noise_levels, steps, numel, variant, reduction, cps_logprob,
                                            dtype))                      # (6, T)
        _COEF_CACHE[key] = (tab, sigmas, noise_levels)  # keep the tensors alive so their ids stay unique
    else:
        tab = tab[0]
    return reference.StepCoefficients(*tab[:, k].unbind(0))


def _module(name: str):
    if name not in _MODULES:
        _MODULES[name] = {"cpp": _load_cpp, "cuda": _load_cuda, "triton": _load_triton}[name]()
    return _MODULES[name]


def available_backends() -> list[str]:
    out = ["torch"]
    if _module("cpp") is not None:
        out.append("cpp")
    if _module("triton") is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append("triton")
    if _module("cuda") is not None and torch.cuda.is_available():
        out.append("cuda")
    return out


def set_backend(name: str) -> None:
    global _BACKEND
    if name not in _VALID:
        raise ValueError(f"ops.backend: {name!r} is not allowed; choose one of {', '.join(_VALID)}")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


def resolve_backend(device: torch.device, backend: Optional[str] = None) -> str:
    b = backend or _BACKEND
    if b == "auto":
        if device.type == "cuda":
            return "triton" if _module("triton") is not None else "torch"
        return "cpp" if _module("cpp") is not None else "torch"
    if b in ("cpp", "triton", "cuda") and _module(b) is None:
        raise RuntimeError(f"ops.backend={b!r} was forced but that backend is not built/importable "
                           f"(available: {', '.join(available_backends())})")
    return b


# ------------------------------------------------------------------------------------------------ sde_step

def sde_step(latent, velocity, sigmas, noise_levels, k, noise, variant="sde", reduction="mean",
             cps_logprob="faithful", backend: Optional[str] = None):
    """-> next latent (latent.dtype, shape of latent), log_prob (B,) fp32. No autograd (sampling only)."""
    b = resolve_backend(latent.device, backend)
    if b == "torch":
        return reference.sde_step(latent, velocity, sigmas, noise_levels, k, noise, variant, reduction, cps_logprob)
    B = latent.shape[0]
    co = _coefficients(sigmas, noise_levels, as_index(k, B, latent.device), latent[0].numel(), variant,
                       reduction, cps_logprob, compute_dtype(latent))
    nxt, sq = _module(b).sde_step(latent.contiguous(), velocity.contiguous(), noise.contiguous(),
                                  co.alpha.float(), co.c.float(), co.std.float())
    return nxt, (-co.q * sq + co.const).to(torch.float32 if latent.dtype != torch.float64 else torch.float64)


# --------------------------------------------------------------------------------------------- sde_logprob

class _SdeLogprob(torch.autograd.Function):
    """Fused log-prob (+ KL) with the velocity gradient computed by the backend's backward kernel."""

    @staticmethod
    def forward(ctx, latent, velocity, next_latent, ref_velocity, alpha, c, q, const, kl_scale, mod):
        sq, kq = mod.sde_logprob_forward(latent, velocity, next_latent, ref_velocity, alpha, c)
        ctx.save_for_backward(latent, velocity, next_latent, ref_velocity, alpha, c, q, kl_scale)
        ctx.mod = mod
        return -q * sq + const, kl_scale * kq

    @staticmethod
    def backward(ctx, g_logp, g_kl):
        latent, velocity, next_latent, ref_velocity, alpha, c, q, kl_scale = ctx.saved_tensors
        g_sq = (-q * g_logp).float().contiguous()
        g_kq = (kl_scale * g_kl).float().contiguous() if g_kl is not None else torch.zeros_like(g_sq)
        grad_v = ctx.mod.sde_logprob_backward(latent, velocity, next_latent, ref_velocity, alpha, c, g_sq, g_kq)
        return None, grad_v, None, None, None, None, None, None, None, None


def sde_logprob(latent, velocity, next_latent, sigmas, noise_levels, k, ref_velocity=None, variant="sde",
                reduction="mean", cps_logprob="faithful", backend: Optional[str] = None):
    """-> log_prob (B,), kl (B,) fp32; differentiable in velocity. See reference.sde_logprob for the math."""
    b = resolve_backend(latent.device, backend)
    if b == "torch":
        return reference.sde_logprob(latent, velocity, next_latent, sigmas, noise_levels, k, ref_velocity,
                                     variant, reduction, cps_logprob)
    B = latent.shape[0]
    co = _coefficients(sigmas, noise_levels, as_index(k, B, latent.device), latent[0].numel(), variant,
                       reduction, cps_logprob, torch.float32)
    ref = ref_velocity.detach().contiguous() if ref_velocity is not None else None
    return _SdeLogprob.apply(latent.contiguous(), velocity.contiguous(), next_latent.contiguous(), ref,
                             co.alpha, co.c, co.q, co.const, co.kl_scale, _module(b))


# ----------------------------------------------------------------------------------------------- grpo_loss

class _GrpoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_prob, old_log_prob, advantages, weights, clip_range, mod):
        per, grad, clipped = mod.grpo_loss_forward(log_prob.float().contiguous(), old_log_prob.float().contiguous(),
                                                   advantages.float().contiguous(), weights.float().contiguous(),
                                                   float(clip_range))
        n = per.numel()
        ctx.save_for_backward(grad)
        ctx.n = n
        ctx.mark_non_differentiable(clipped)
        return per.sum() / n, clipped

    @staticmethod
    def backward(ctx, g_loss, _g_clipped):
        (grad,) = ctx.saved_tensors
        return grad * (g_loss / ctx.n), None, None, None, None, None


def grpo_loss(log_prob, old_log_prob, advantages, weights, clip_range, kl=None, beta=0.0,
              backend: Optional[str] = None):
    """-> loss, clipfrac, approx_kl (scalars). See reference.grpo_loss."""
    b = resolve_backend(log_prob.device, backend)
    if b == "torch" or log_prob.dtype == torch.float64:
        return reference.grpo_loss(log_prob, old_log_prob, advantages, weights, clip_range, kl, beta)
    if weights is None:
        weights = torch.ones_like(log_prob)
    loss, clipped = _GrpoLoss.apply(log_prob, old_log_prob, advantages, weights, clip_range, _module(b))
    if kl is not None and beta > 0:
        loss = loss + beta * kl.float().mean()
    with torch.no_grad():
        d = log_prob.float() - old_log_prob.float()
        approx_kl = 0.5 * (d * d).mean()
    return loss, clipped.float().mean(), approx_kl
