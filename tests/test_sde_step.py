"""sde_step: the torch reference against hand-derived fp64 formulas, then every backend against the reference."""
import math

import pytest
import torch

from densegrpo_fast import ops
from densegrpo_fast.ops import reference
from densegrpo_fast.rollout.schedule import flow_sigmas
from conftest import assert_close, backend_device, backend_params, fixed_seed
from fp64_formulas import logprob, sde_mean_std

BACKENDS = backend_params()
FAST = backend_params(include_torch=False)


def _inputs(B, shape, dtype, seed, T=10):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    v = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    eps = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    return z, v, eps, flow_sigmas(T, 3.0).double()


@pytest.mark.parametrize("variant", ["sde", "cps"])
@pytest.mark.parametrize("k", [0, 3, 8])
def test_reference_matches_the_formulas_fp64(variant, k):
    z, v, eps, sig = _inputs(3, (4, 5, 7), torch.float64, seed=k)
    a = 0.7
    levels = torch.full((10,), a, dtype=torch.float64)
    nxt, lp = reference.sde_step(z, v, sig, levels, k, eps, variant)
    mean, std, _ = sde_mean_std(z, v, sig, k, a, variant)
    assert_close(nxt, mean + std * eps, torch.float64, "next latent")
    assert_close(lp, logprob(mean + std * eps, mean, std, "mean"), torch.float64, "log_prob mean")
    _, lp_sum = reference.sde_step(z, v, sig, levels, k, eps, variant, reduction="sum")
    assert_close(lp_sum, logprob(mean + std * eps, mean, std, "sum"), torch.float64, "log_prob sum")


def test_sigma_one_uses_one_minus_sigma1():
    # at k = 0, sigma = 1: s = a sqrt(1 / (1 - sigma_1)) — finite, not inf
    co = reference.step_coefficients(flow_sigmas(10).double(), torch.full((10,), 0.7).double(),
                                      torch.tensor([0]), 16, dtype=torch.float64)
    s = 0.7 * math.sqrt(1 / (1 - float(flow_sigmas(10)[1])))
    dt = float(flow_sigmas(10)[1]) - 1
    assert math.isclose(co.std.item(), s * math.sqrt(-dt), rel_tol=1e-6)


@pytest.mark.parametrize("variant", ["sde", "cps"])
def test_noise_level_zero_is_euler(variant):
    z, v, eps, sig = _inputs(2, (3, 4, 4), torch.float64, seed=5)
    for k in (0, 4, 9):
        nxt, lp = reference.sde_step(z, v, sig, torch.zeros(10, dtype=torch.float64), k, eps, variant)
        assert_close(nxt, z + v * (sig[k + 1] - sig[k]), torch.float64, f"euler k={k}")
        assert (lp == 0).all()


@pytest.mark.parametrize("variant", ["sde", "cps"])
def test_sample_moments(variant):
    """The empirical mean and std of z' over many noises match the formulas' mean and std."""
    z, v, _, sig = _inputs(1, (2, 2, 2), torch.float64, seed=9)
    n = 20000
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(n, 2, 2, 2, generator=g, dtype=torch.float64)
    nxt, _ = reference.sde_step(z.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), sig,
                                torch.full((10,), 0.7, dtype=torch.float64), 2, eps, variant)
    mean, std, _ = sde_mean_std(z, v, sig, 2, 0.7, variant)
    assert torch.allclose(nxt.mean(0), mean[0], atol=4 * std / n ** 0.5)
    assert abs(nxt.std(0).mean().item() / std - 1) < 0.02


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 8, 8), (3, 5, 7), (4, 33, 65)])
@pytest.mark.parametrize("variant", ["sde", "cps"])
def test_backends_match_reference(backend, dtype, shape, variant):
    B = 5
    g = torch.Generator().manual_seed(fixed_seed(backend, dtype, shape, variant))
    z = torch.randn(B, *shape, generator=g).to(dtype)
    v = torch.randn(B, *shape, generator=g).to(dtype)
    eps = torch.randn(B, *shape, generator=g).to(dtype)
    sig = flow_sigmas(10)
    levels = torch.rand(10, generator=g) * 0.9  # a different level per step
    k = torch.tensor([0, 1, 4, 8, 9])
    d = backend_device(backend)
    out_nxt, out_lp = ops.sde_step(z.to(d), v.to(d), sig.to(d), levels.to(d), k.to(d), eps.to(d), variant,
                                   backend=backend)
    out_nxt, out_lp = out_nxt.cpu(), out_lp.cpu()
    # fp64 reference on the same (rounded) inputs
    ref_nxt, _ = reference.sde_step(z.double(), v.double(), sig.double(), levels.double(), k, eps.double(), variant)
    assert out_nxt.dtype == dtype and torch.isfinite(out_lp).all()
    assert_close(out_nxt.float(), ref_nxt.to(dtype).float(), dtype, "next latent")
    # log-prob of the stored sample: compare against the fp64 log-prob of that very sample
    lp64, _ = reference.sde_logprob(z.double(), v.double(), out_nxt.double(), sig.double(), levels.double(), k,
                                    variant=variant)
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}[dtype]
    assert torch.allclose(out_lp.double(), lp64, rtol=tol, atol=tol), (out_lp, lp64)
