"""sde_step: next = alpha_b z + c_b v + std_b eps (latent dtype), sq_b = sum (next - mu)^2. Grid (B, D / BLOCK)."""
import torch
import triton
import triton.language as tl

from ._rows import load_row_block

BLOCK = 2048


@triton.jit
def _sde_step_kernel(z_ptr, v_ptr, n_ptr, out_ptr, alpha_ptr, c_ptr, std_ptr, part_ptr, D, NBLK,
                     BLOCK: tl.constexpr):
    offs, m, z, v, e, a, c = load_row_block(z_ptr, v_ptr, n_ptr, alpha_ptr, c_ptr, D, BLOCK)
    b = tl.program_id(0)
    mu = a * z + c * v
    nx = (mu + tl.load(std_ptr + b) * e).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, nx, mask=m)
    d = tl.where(m, nx.to(tl.float32) - mu, 0.0)
    tl.store(part_ptr + b * NBLK + tl.program_id(1), tl.sum(d * d, axis=0))


def sde_step(z, v, noise, alpha, c, std, out=None):
    B = z.shape[0]
    D = z.numel() // B
    nblk = triton.cdiv(D, BLOCK)
    out = torch.empty_like(z) if out is None else out
    part = torch.empty(B, nblk, device=z.device, dtype=torch.float32)
    _sde_step_kernel[(B, nblk)](z, v, noise, out, alpha, c, std, part, D, nblk, BLOCK=BLOCK)
    return out, part.sum(1, dtype=torch.float64).float()
