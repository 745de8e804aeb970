"""sde_logprob (+ KL) forward and the velocity gradient: every backend against the reference / autograd."""
import pytest
import torch

from densegrpo_fast import ops
from densegrpo_fast.ops import reference
from densegrpo_fast.rollout.schedule import flow_sigmas
from conftest import assert_close, backend_device, backend_params, poison_like
from fp64_formulas import logprob, sde_mean_std

BACKENDS = backend_params()
FAST = backend_params(include_torch=False)


@pytest.mark.parametrize("variant", ["sde", "cps"])
def test_reference_logprob_and_kl_by_formula(variant):
    g = torch.Generator().manual_seed(3)
    z, v, vr, x = (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) for _ in range(4))
    sig = flow_sigmas(10).double()
    lp, kl = reference.sde_logprob(z, v, x, sig, torch.full((10,), 0.7, dtype=torch.float64), 2, vr,
                                   variant=variant)
    mean, std, kl_std = sde_mean_std(z, v, sig, 2, 0.7, variant)
    mean_ref, _, _ = sde_mean_std(z, vr, sig, 2, 0.7, variant)
    assert_close(lp, logprob(x, mean, std), torch.float64, "log_prob")
    assert_close(kl, ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * kl_std ** 2), torch.float64, "kl")


def _case(B, shape, dtype, seed, with_ref):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(B, *shape, generator=g)  # noqa: E731
    z, v, vr = mk().to(dtype), mk().to(dtype), (mk().to(dtype) if with_ref else None)
    zn = (z.float() * 0.97 + 0.05 * mk()).to(dtype)
    return z, v, zn, vr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 8, 8), (3, 5, 7), (1, 1, 1)])
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("variant,reduction", [("sde", "mean"), ("sde", "sum"), ("cps", "mean")])
def test_forward_backward_match_reference(backend, dtype, shape, with_ref, variant, reduction):
    B = 6
    z, v, zn, vr = _case(B, shape, dtype, seed=len(shape) * 7 + B, with_ref=with_ref)
    sig = flow_sigmas(10)
    levels = torch.full((10,), 0.7)
    k = torch.tensor([0, 2, 3, 5, 7, 8])
    w_lp, w_kl = torch.randn(B), torch.randn(B)  # arbitrary upstream gradients

    d = backend_device(backend)
    v1 = v.clone().to(d).requires_grad_(True)
    lp, kl = ops.sde_logprob(z.to(d), v1, zn.to(d), sig.to(d), levels.to(d), k.to(d),
                             vr.to(d) if vr is not None else None, variant, reduction, backend=backend)
    ((lp * w_lp.to(d)).sum() + (kl * w_kl.to(d)).sum()).backward()
    lp, kl = lp.cpu(), kl.cpu()

    v64 = v.double().requires_grad_(True)
    lp64, kl64 = reference.sde_logprob(z.double(), v64, zn.double(), sig.double(), levels.double(), k,
                                       vr.double() if vr is not None else None, variant, reduction)
    ((lp64 * w_lp.double()).sum() + (kl64 * w_kl.double()).sum()).backward()

    tol = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert torch.allclose(lp.double(), lp64, rtol=tol, atol=tol), (lp, lp64)
    assert torch.allclose(kl.double(), kl64, rtol=tol, atol=tol), (kl, kl64)
    assert v1.grad.dtype == dtype
    assert_close(v1.grad.float().cpu(), v64.grad.to(dtype).float(), dtype, "grad v")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_ref", [False, True])
def test_raw_kernels_write_every_element(backend, dtype, with_ref):
    """Outputs poisoned with NaN before the run: a kernel that skips an element (odd tail) cannot pass."""
    d = backend_device(backend)
    z, v, zn, vr = (t.to(d) if t is not None else None for t in _case(3, (5, 7, 9), dtype, seed=11,
                                                                       with_ref=with_ref))
    mod = ops._module(backend)
    alpha, c = (torch.rand(3) + 0.5).to(d), (-torch.rand(3)).to(d)
    g_sq, g_kq = torch.randn(3).to(d), torch.randn(3).to(d)
    out = poison_like(v)
    ret = mod.sde_logprob_backward(z, v, zn, vr, alpha, c, g_sq, g_kq, out=out)
    assert ret.data_ptr() == out.data_ptr() and torch.isfinite(out.float()).all()
    # fp64 by hand: grad_v = g_sq (-2 c (zn - alpha z - c v)) + g_kq 2 (v - v_ref)
    b = lambda t: t.double().cpu().view(-1, 1, 1, 1)  # noqa: E731
    z64, v64, zn64 = z.double().cpu(), v.double().cpu(), zn.double().cpu()
    expect = b(g_sq) * (-2 * b(c) * (zn64 - b(alpha) * z64 - b(c) * v64))
    if vr is not None:
        expect = expect + b(g_kq) * 2 * (v64 - vr.double().cpu())
    assert_close(out.float().cpu(), expect.to(dtype).float(), dtype, "raw backward")
    nxt = poison_like(z)
    std = torch.rand(3).to(d)
    mod.sde_step(z, v, zn, alpha, c, std, out=nxt)  # zn plays the noise here
    expect = b(alpha) * z64 + b(c) * v64 + b(std) * zn64
    assert_close(nxt.float().cpu(), expect.to(dtype).float(), dtype, "raw sde_step")


@pytest.mark.parametrize("backend", FAST)
def test_gradcheck_fp32_small(backend):
    """The fused backward is the derivative of the fused forward (finite differences in fp32, loose tol)."""
    d = backend_device(backend)
    z, v, zn, vr = (t.to(d) for t in _case(2, (2, 3, 3), torch.float32, seed=1, with_ref=True))
    sig, levels, k = flow_sigmas(10, device=d), torch.full((10,), 0.7, device=d), torch.tensor([1, 4], device=d)
    v = v.requires_grad_(True)
    lp, kl = ops.sde_logprob(z, v, zn, sig, levels, k, vr, backend=backend)
    (lp.sum() + kl.sum()).backward()
    i = (0, 1, 2, 2)
    h = 1e-2
    vp, vm = v.detach().clone(), v.detach().clone()
    vp[i] += h
    vm[i] -= h
    f = lambda vv: sum(t.sum() for t in ops.sde_logprob(z, vv, zn, sig, levels, k, vr, backend=backend))  # noqa
    fd = (f(vp) - f(vm)) / (2 * h)
    assert abs(fd.item() - v.grad[i].item()) < 2e-2 * max(1.0, abs(fd.item()))
