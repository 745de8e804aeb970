"""grpo_loss forward over N samples: per_i = w_i max(-A rho, -A clip(rho, 1-eps, 1+eps)), its d/dlogp, clip flags."""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _grpo_loss_kernel(lp_ptr, old_ptr, adv_ptr, w_ptr, per_ptr, grad_ptr, clip_ptr, N, eps, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    lp = tl.load(lp_ptr + offs, mask=m, other=0.0)
    old = tl.load(old_ptr + offs, mask=m, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=m, other=0.0)
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    rho = tl.exp(lp - old)
    rc = tl.minimum(tl.maximum(rho, 1.0 - eps), 1.0 + eps)
    u = -adv * rho
    cl = -adv * rc
    tl.store(per_ptr + offs, w * tl.maximum(u, cl), mask=m)
    inside = (rho >= 1.0 - eps) & (rho <= 1.0 + eps)
    tl.store(grad_ptr + offs, tl.where(inside | (u > cl), w * u, 0.0), mask=m)
    tl.store(clip_ptr + offs, (tl.abs(rho - 1.0) > eps).to(tl.int8), mask=m)


def grpo_loss_forward(lp, old, adv, w, clip):
    N = lp.numel()
    per = torch.empty_like(lp)
    grad = torch.empty_like(lp)
    clipped = torch.empty(N, device=lp.device, dtype=torch.int8)
    _grpo_loss_kernel[(triton.cdiv(N, BLOCK),)](lp, old, adv, w, per, grad, clipped, N, float(clip), BLOCK=BLOCK)
    return per, grad, clipped.bool()
