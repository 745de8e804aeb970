"""sde_step: next = alpha_b z + c_b v + std_b eps (latent dtype), sq_b = sum (next - mu)^2. Grid (B, D / BLOCK)."""
import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _sde_step_kernel(z_ptr, v_ptr, n_ptr, out_ptr, alpha_ptr, c_ptr, std_ptr, part_ptr, D, NBLK,
                     BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    m = offs < D
    row = b.to(tl.int64) * D
    a = tl.load(alpha_ptr + b)
    c = tl.load(c_ptr + b)
    s = tl.load(std_ptr + b)
    z = tl.load(z_ptr + row + offs, mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row + offs, mask=m, other=0.0).to(tl.float32)
    e = tl.load(n_ptr + row + offs, mask=m, other=0.0).to(tl.float32)
    mu = a * z + c * v
    nx = (mu + s * e).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row + offs, nx, mask=m)
    d = tl.where(m, nx.to(tl.float32) - mu, 0.0)
    tl.store(part_ptr + b * NBLK + j, tl.sum(d * d, axis=0))


def sde_step(z, v, noise, alpha, c, std, out=None):
    B = z.shape[0]
    D = z.numel() // B
    nblk = triton.cdiv(D, BLOCK)
    out = torch.empty_like(z) if out is None else out
    part = torch.empty(B, nblk, device=z.device, dtype=torch.float32)
    _sde_step_kernel[(B, nblk)](z, v, noise, out, alpha, c, std, part, D, nblk, BLOCK=BLOCK)
    return out, part.sum(1, dtype=torch.float64).float()
