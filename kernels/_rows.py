"""The prologue every latent kernel shares: one BLOCK of one sample's row, loaded as fp32, and its coefficients."""
import triton
import triton.language as tl


@triton.jit
def load_row_block(z_ptr, v_ptr, x_ptr, alpha_ptr, c_ptr, D, BLOCK: tl.constexpr):
    """Program (b, j): -> offsets into the flat (B, D) tensors, mask, z, v, x (fp32, 0 outside), alpha_b, c_b."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    m = cols < D
    offs = b.to(tl.int64) * D + cols
    z = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    return offs, m, z, v, x, tl.load(alpha_ptr + b), tl.load(c_ptr + b)
