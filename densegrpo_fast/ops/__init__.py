"""Dispatch for the fused ops `sde_step`, `sde_logprob`, `grpo_loss`.

Backends: "torch" (ops/reference.py), "cpp" (csrc/sde_ops.cpp, OpenMP, CPU tensors), "triton" (kernels/, CUDA,
or CPU under TRITON_INTERPRET=1), "cuda" (csrc/sde_ops_kernels.cu). "auto": CPU tensors -> cpp when the extension is
built, else torch; CUDA tensors -> the backend that `measured.json` (beside this file, or the file named by
DENSEGRPO_OPS_MEASURED) records for this device's name, else triton. `ops.backend` in the config or
DENSEGRPO_OPS_BACKEND forces one.

The rule between triton and cuda (`choose_cuda_backend`, applied by bench/gpu_check.py, which writes the entry for
its device): cuda is chosen only when it is at least 5 % faster than triton over the measured cases (geometric mean
of the per-case time ratios, sde_step and sde_logprob fwd+bwd, fp32 and bf16, the rollout and training batch
sizes); a tie, a missing measurement or an unbuilt cuda extension means triton (a pinned dependency that needs no
build step).
The fast backends compute only the per-sample reductions over C*H*W and the velocity gradient; the per-sample
scalar math (reference.step_coefficients) is shared, so every backend has the same formulas.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional

import torch

from . import reference
from .reference import as_index, compute_dtype, step_coefficients

_BACKEND = os.environ.get("DENSEGRPO_OPS_BACKEND", "auto")
_VALID = ("auto", "torch", "cpp", "triton", "cuda")


_LOAD_ERRORS: dict = {}
_WARNED: set = set()
_EXT_NAMES = {"cpp": "densegrpo_fast._C", "cuda": "densegrpo_fast._C_cuda"}


def build_info() -> dict:
    """What `pip install` (setup.py) attempted to build and what failed: {"attempted": [...], "failed": {...}}.
    Empty when the package was installed without building the extensions (DENSEGRPO_NO_EXT=1)."""
    import json
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def expected(name: str) -> bool:
    """Whether backend `name` should be importable here: triton always (a pinned dependency); cpp / cuda when the
    install attempted to build them (and, for cuda, a GPU is present)."""
    if name in ("torch", "triton"):
        return True
    attempted = _EXT_NAMES[name] in build_info().get("attempted", [])
    return attempted and (name != "cuda" or torch.cuda.is_available())


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _load_ext(name: str):
    try:
        return importlib.import_module(_EXT_NAMES[name])
    except Exception as exc:  # not built, or built against another torch
        _LOAD_ERRORS[name] = f"{type(exc).__name__}: {exc}"
        if expected(name):
            failed = build_info().get("failed", {}).get(_EXT_NAMES[name])
            _warn_once(name, f"densegrpo_fast: the {name} ops were built by the install but do not import "
                             f"({_LOAD_ERRORS[name]}{'; build error: ' + failed if failed else ''}); "
                             f"rebuild with `make install` (falling back to other backends)")
        return None


def _load_triton():
    try:
        from densegrpo_fast import kernels
        return kernels
    except Exception as exc:  # triton missing or broken
        _LOAD_ERRORS["triton"] = f"{type(exc).__name__}: {exc}"
        _warn_once("triton", f"densegrpo_fast: Triton kernels unavailable ({exc})")
        return None


def unavailable_reason(name: str) -> Optional[str]:
    """Why backend `name` cannot run here, or None when it can."""
    if name == "torch":
        return None
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if name == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return "no CUDA device and TRITON_INTERPRET is not set"
    if _module(name) is None:
        return _LOAD_ERRORS.get(name, "not importable")
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
        _MODULES[name] = _load_triton() if name == "triton" else _load_ext(name)
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


CUDA_CHOICE_MARGIN = 0.95   # cuda must take <= 0.95x triton's time (geometric mean over the cases) to be chosen


def choose_cuda_backend(times: dict) -> dict:
    """The auto rule for CUDA tensors from measured medians {backend: {case: seconds}} ("triton", "cuda").
    -> {"auto": backend, "ratio_cuda_over_triton": geometric mean over the shared cases or None, "cases": n}."""
    import math
    tri, cu = times.get("triton") or {}, times.get("cuda") or {}
    cases = sorted(c for c in tri if c in cu and tri[c] > 0 and cu[c] > 0)
    if not cases:
        return {"auto": "triton", "ratio_cuda_over_triton": None, "cases": 0}
    ratio = math.exp(sum(math.log(cu[c] / tri[c]) for c in cases) / len(cases))
    return {"auto": "cuda" if ratio <= CUDA_CHOICE_MARGIN else "triton", "ratio_cuda_over_triton": ratio,
            "cases": len(cases)}


def measured_path() -> str:
    return os.environ.get("DENSEGRPO_OPS_MEASURED") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     "measured.json")


_MEASURED: dict = {}


def measured_cuda_backend(device: torch.device) -> Optional[str]:
    """The backend measured.json records for this CUDA device's name (None when it has no entry). Read once per
    device; no host sync."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _MEASURED:
        import json
        try:
            with open(measured_path()) as f:
                table = json.load(f)
        except (OSError, ValueError):
            table = {}
        entry = table.get(torch.cuda.get_device_name(idx)) or {}
        _MEASURED[idx] = entry.get("auto") if entry.get("auto") in ("triton", "cuda") else None
    return _MEASURED[idx]


def resolve_backend(device: torch.device, backend: Optional[str] = None) -> str:
    b = backend or _BACKEND
    if b == "auto":
        fast = "triton" if device.type == "cuda" else "cpp"
        if fast == "triton" and measured_cuda_backend(device) == "cuda" and _module("cuda") is not None:
            return "cuda"
        if _module(fast) is not None:
            return fast
        _warn_once("fallback-" + fast, f"densegrpo_fast: {fast} ops unavailable "
                                       f"({_LOAD_ERRORS.get(fast, 'not built')}); using the torch reference ops")
        return "torch"
    if b in ("cpp", "triton", "cuda") and _module(b) is None:
        raise RuntimeError(f"ops.backend={b!r} was forced but that backend is not built/importable "
                           f"(available: {', '.join(available_backends())})")
    return b


# ------------------------------------------------------------------------------------------------ sde_step

def sde_step(latent, velocity, sigmas, noise_levels, k, noise, variant="sde", reduction="mean",
             cps_logprob="faithful", backend: Optional[str] = None):
    """-> next latent (latent.dtype, shape of latent), log_prob (B,) fp32. No autograd (sampling only)."""
    b = resolve_backend(latent.device, backend)
    if b == "torch" or latent.dtype == torch.float64:  # the kernels take fp32 coefficients: fp64 is the reference's
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
    if b == "torch" or latent.dtype == torch.float64:  # the kernels take fp32 coefficients: fp64 is the reference's
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
    if kl is not None and beta > 0:  # the same weights as the policy term (reference.grpo_loss)
        loss = loss + beta * (weights.float() * kl.float()).mean()
    with torch.no_grad():
        d = log_prob.float() - old_log_prob.float()
        approx_kl = 0.5 * (d * d).mean()
    return loss, clipped.float().mean(), approx_kl
