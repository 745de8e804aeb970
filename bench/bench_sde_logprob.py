"""sde_logprob forward + backward (the training hot path) at SD3.5-M 512 px latents (16x64x64): torch eager vs the
fused kernels, and a plain copy of the same bytes (the bandwidth ceiling). Bytes counted for the fused path:
forward reads z, v, z' and backward reads them again and writes grad_v: 7 tensors of the latent's size."""
import pytest
import torch

from densegrpo_fast import ops
from densegrpo_fast.rollout.schedule import flow_sigmas

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in (("triton", "cuda") if DEV == "cuda" else ("cpp",)) if b in ops.available_backends()]
BATCHES = [9, 64] if DEV == "cuda" else [9, 32]
DTYPES = [torch.float32, torch.bfloat16] if DEV == "cuda" else [torch.float32]


def _inputs(B, dtype):
    g = torch.Generator(device=DEV).manual_seed(0)
    mk = lambda: torch.randn(B, 16, 64, 64, generator=g, device=DEV).to(dtype)  # noqa: E731
    return mk(), mk(), mk(), flow_sigmas(10, device=DEV), torch.full((10,), 0.7, device=DEV), \
        torch.randint(0, 9, (B,), generator=g, device=DEV)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(backend, z, v, zn, sig, lv, k):
    def run():
        vv = v.detach().requires_grad_(True)
        lp, _ = ops.sde_logprob(z, vv, zn, sig, lv, k, backend=backend)
        lp.sum().backward()
        _sync()
        return vv.grad
    return run


def test_copy_bandwidth(benchmark, record):
    """The machine's copy bandwidth: 256 MB in, 256 MB out (no cache holds it)."""
    src = torch.randn(64 * 2 ** 20, device=DEV)
    dst = torch.empty_like(src)
    benchmark(lambda: (dst.copy_(src), _sync()))
    record("machine", "copy_256MB", 2 * src.numel() * 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("path", ["copy", "eager"] + FAST)
def test_sde_logprob_fwd_bwd(benchmark, record, B, dtype, path):
    z, v, zn, sig, lv, k = _inputs(B, dtype)
    n = z.numel() * z.element_size()
    if path == "copy":
        dst = torch.empty_like(z)
        benchmark(lambda: (dst.copy_(z), _sync()))
        record(f"sde_logprob B={B} {dtype}", "copy", 2 * n)
        return
    fn = _fwd_bwd("torch" if path == "eager" else path, z, v, zn, sig, lv, k)
    fn()
    benchmark(fn)
    record(f"sde_logprob B={B} {dtype}", path, 7 * n)


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("path", ["copy", "eager"] + FAST)
def test_sde_step(benchmark, record, B, path):
    """Sampling step: reads z, v, eps, writes z' (4 tensors)."""
    z, v, eps, sig, lv, k = _inputs(B, torch.float32)
    n = z.numel() * 4
    if path == "copy":
        dst = torch.empty_like(z)
        benchmark(lambda: (dst.copy_(z), _sync()))
        record(f"sde_step B={B}", "copy", 2 * n)
        return
    backend = "torch" if path == "eager" else path
    benchmark(lambda: (ops.sde_step(z, v, sig, lv, k, eps, backend=backend), _sync()))
    record(f"sde_step B={B}", path, 4 * n)


@pytest.mark.parametrize("path", ["eager"] + FAST)
@pytest.mark.parametrize("N", [9 * 9, 64 * 9 * 16])
def test_grpo_loss(benchmark, record, N, path):
    """grpo_loss forward + backward over N (trajectory, step) samples: reads logp, old logp, A, w; writes the grad."""
    g = torch.Generator(device=DEV).manual_seed(1)
    lp = torch.randn(N, generator=g, device=DEV) * 1e-3
    old, adv, w = torch.randn(N, generator=g, device=DEV) * 1e-3, torch.randn(N, generator=g, device=DEV), \
        torch.rand(N, generator=g, device=DEV)
    backend = "torch" if path == "eager" else path

    def run():
        x = lp.detach().requires_grad_(True)
        loss, _, _ = ops.grpo_loss(x, old, adv, w, 1e-3, backend=backend)
        loss.backward()
        _sync()
    run()
    benchmark(run)
    record(f"grpo_loss N={N}", path, 5 * N * 4)
