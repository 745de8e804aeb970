"""grpo_loss: hand-computed cases, then backends against the reference (values and gradients)."""
import math

import pytest
import torch

from densegrpo_fast import ops
from densegrpo_fast.ops import reference
from conftest import backend_device, backend_params

BACKENDS = backend_params()
FAST = backend_params(include_torch=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed(backend):
    # eps = 0.2. Sample 1: A = +1, rho = e^0.5 = 1.6487 -> unclipped -1.6487, clipped -1.2: max = -1.2 (clipped)
    # Sample 2: A = -1, rho = e^-0.5 = 0.6065 -> unclipped 0.6065, clipped 0.8: max = 0.8 (clipped)
    # Sample 3: A = +2, rho = 1 -> -2 (inside). Mean over 3: (-1.2 + 0.8 - 2) / 3 = -0.8
    d = backend_device(backend)
    lp = torch.tensor([0.5, -0.5, 0.0], device=d, requires_grad=True)
    old = torch.zeros(3, device=d)
    adv = torch.tensor([1.0, -1.0, 2.0], device=d)
    loss, clipfrac, approx_kl = ops.grpo_loss(lp, old, adv, None, 0.2, backend=backend)
    assert math.isclose(loss.item(), -0.8, rel_tol=1e-6)
    assert math.isclose(clipfrac.item(), 2 / 3, rel_tol=1e-6)
    # approx_kl = mean(d^2)/2 = (0.25 + 0.25 + 0)/3/2
    assert math.isclose(approx_kl.item(), 0.5 / 6, rel_tol=1e-6)
    loss.backward()
    # clipped samples get no gradient; sample 3: d(-A rho)/dlogp = -A rho = -2, / N = -2/3
    torch.testing.assert_close(lp.grad.cpu(), torch.tensor([0.0, 0.0, -2 / 3]))


def test_kl_term_and_weights():
    # loss = mean_i w_i (policy_i + beta kl_i). rho = 1, so policy_i = -A_i: [-1, -5].
    # w = [2, 0]: (2 * (-1 + 0.5 * 0.3) + 0 * (-5 + 0.5 * 0.1)) / 2 = -0.85
    lp = torch.zeros(2)
    loss, _, _ = reference.grpo_loss(lp, torch.zeros(2), torch.tensor([1.0, 5.0]), torch.tensor([2.0, 0.0]),
                                     1e-4, kl=torch.tensor([0.3, 0.1]), beta=0.5)
    assert math.isclose(loss.item(), -0.85, rel_tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_sample_gets_no_gradient_through_either_term(backend):
    """Padding pairs (weight 0) must not move the policy: no gradient through the clipped term nor the KL.
    weights [1, 0], kl [0, 10] (beta = 0.1), A = [1, 1], rho = 1:
    d loss / d logp = w_i * (-A_i rho_i) / N = [-1/2, 0];  d loss / d kl = beta w_i / N = [0.05, 0]."""
    d = backend_device(backend)
    lp = torch.zeros(2, device=d, requires_grad=True)
    kl = torch.tensor([0.0, 10.0], device=d, requires_grad=True)
    loss, _, _ = ops.grpo_loss(lp, torch.zeros(2, device=d), torch.ones(2, device=d),
                               torch.tensor([1.0, 0.0], device=d), 1e-4, kl, 0.1, backend=backend)
    loss.backward()
    assert math.isclose(loss.item(), -0.5, rel_tol=1e-6)  # (1 * (-1 + 0.1 * 0) + 0 * (...)) / 2
    torch.testing.assert_close(lp.grad.cpu(), torch.tensor([-0.5, 0.0]))
    torch.testing.assert_close(kl.grad.cpu(), torch.tensor([0.05, 0.0]))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("n", [1, 37, 1025, 4099])
def test_backends_match_reference(backend, n):
    g = torch.Generator().manual_seed(n)
    d = backend_device(backend)
    lp = (torch.randn(n, generator=g) * 1e-3).to(d).requires_grad_(True)
    old = (torch.randn(n, generator=g) * 1e-3).to(d)
    adv = torch.randn(n, generator=g).to(d)
    w = torch.rand(n, generator=g).to(d)
    kl = torch.rand(n, generator=g).to(d)
    loss, cf, ak = ops.grpo_loss(lp, old, adv, w, 1e-3, kl, 0.04, backend=backend)
    loss.backward()
    lp64 = lp.detach().double().cpu().requires_grad_(True)
    l64, cf64, ak64 = reference.grpo_loss(lp64, old.double().cpu(), adv.double().cpu(), w.double().cpu(), 1e-3,
                                          kl.double().cpu(), 0.04)
    l64.backward()
    assert math.isclose(loss.item(), l64.item(), rel_tol=1e-5, abs_tol=1e-8)
    assert abs(cf.item() - cf64.item()) <= 2 / n  # a flag may flip at the fp32 boundary
    assert math.isclose(ak.item(), ak64.item(), rel_tol=1e-4, abs_tol=1e-12)
    torch.testing.assert_close(lp.grad.double().cpu(), lp64.grad, rtol=1e-5, atol=1e-7)
