"""sde_logprob forward (sq_b = sum (zn - alpha z - c v)^2, kq_b = sum (v - v_ref)^2) and backward
(grad_v = g_sq_b (-2 c_b d) + g_kq_b 2 (v - v_ref)). Grid (B, D / BLOCK); fp32 math for any input dtype."""
import torch
import triton
import triton.language as tl

from ._rows import load_row_block

BLOCK = 2048


@triton.jit
def _sde_logprob_fwd_kernel(z_ptr, v_ptr, zn_ptr, r_ptr, alpha_ptr, c_ptr, psq_ptr, pkq_ptr, D, NBLK,
                            HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    offs, m, z, v, zn, a, c = load_row_block(z_ptr, v_ptr, zn_ptr, alpha_ptr, c_ptr, D, BLOCK)
    out = tl.program_id(0) * NBLK + tl.program_id(1)
    d = zn - (a * z + c * v)
    tl.store(psq_ptr + out, tl.sum(d * d, axis=0))
    if HAS_REF:
        k = v - tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(pkq_ptr + out, tl.sum(k * k, axis=0))


@triton.jit
def _sde_logprob_bwd_kernel(z_ptr, v_ptr, zn_ptr, r_ptr, alpha_ptr, c_ptr, gs_ptr, gk_ptr, out_ptr, D,
                            HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    offs, m, z, v, zn, a, c = load_row_block(z_ptr, v_ptr, zn_ptr, alpha_ptr, c_ptr, D, BLOCK)
    b = tl.program_id(0)
    g = (-2.0 * c * tl.load(gs_ptr + b)) * (zn - (a * z + c * v))
    if HAS_REF:
        g += 2.0 * tl.load(gk_ptr + b) * (v - tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32))
    tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=m)


def sde_logprob_forward(z, v, zn, vref, alpha, c):
    B = z.shape[0]
    D = z.numel() // B
    nblk = triton.cdiv(D, BLOCK)
    psq = torch.empty(B, nblk, device=z.device, dtype=torch.float32)
    pkq = torch.zeros(B, nblk, device=z.device, dtype=torch.float32)
    has_ref = vref is not None
    _sde_logprob_fwd_kernel[(B, nblk)](z, v, zn, vref if has_ref else v, alpha, c, psq, pkq, D, nblk,
                                       HAS_REF=has_ref, BLOCK=BLOCK)
    return psq.sum(1, dtype=torch.float64).float(), pkq.sum(1, dtype=torch.float64).float()


def sde_logprob_backward(z, v, zn, vref, alpha, c, g_sq, g_kq, out=None):
    B = z.shape[0]
    D = z.numel() // B
    out = torch.empty_like(v) if out is None else out
    has_ref = vref is not None
    _sde_logprob_bwd_kernel[(B, triton.cdiv(D, BLOCK))](z, v, zn, vref if has_ref else v, alpha, c, g_sq, g_kq,
                                                        out, D, HAS_REF=has_ref, BLOCK=BLOCK)
    return out
