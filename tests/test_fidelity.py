"""Two points of fidelity: TempFlow-GRPO's noise-aware weights average one over the steps actually trained, and the
calibration's stored a_k is the paper's per-step noise level psi(k) = s_k in other units."""
import pytest
import torch

from densegrpo_fast.config import load_config
from densegrpo_fast.credit import make_credit, noise_aware_weights
from densegrpo_fast.credit.calibration import levels_from_noise, noise_scale, update_levels
from densegrpo_fast.ops.reference import step_coefficients
from densegrpo_fast.rollout.schedule import NoiseSchedule, flow_sigmas


def _method(*sets):
    cfg = load_config(None, ["sampling.steps=10", "train.group_size=8", "credit.noise_aware_weights=true", *sets])
    return cfg, make_credit(cfg, NoiseSchedule(flow_sigmas(10, 3.0), 0.7, "cpu"))


@pytest.mark.parametrize("steps,old_mean", [("[0, 2, 4, 6]", 1.10), ("[4, 6]", 0.80)])
def test_noise_aware_weights_mean_one_over_the_branch_steps(steps, old_mean):
    cfg, m = _method("credit.method=branching", f"credit.branch_steps={steps}")
    ks = m.trained_steps()
    assert ks == eval(steps)
    w = m.step_weights()
    assert w[ks].mean().item() == pytest.approx(1.0, abs=1e-6)   # every branch step has the same number of pairs
    # normalised over the first floor(0.99 T) = 9 steps instead, the branch steps averaged 1.10 / 0.80
    assert noise_aware_weights(m.sched, cfg)[ks].mean().item() == pytest.approx(old_mean, abs=0.01)
    # the ratios between steps are TempFlow-GRPO's std_k / std_j either way
    old = noise_aware_weights(m.sched, cfg)
    torch.testing.assert_close(w / w[ks[0]], old / old[ks[0]])


def test_noise_aware_weights_follow_the_mask_of_early_steps():
    _, m = _method("credit.method=dense", "credit.train_from_step=3")
    assert m.trained_steps() == list(range(3, 9))
    assert m.step_weights()[3:9].mean().item() == pytest.approx(1.0, abs=1e-6)
    _, m = _method("credit.method=sparse")
    assert m.trained_steps() == list(range(9)) and m.step_weights()[:9].mean().item() == pytest.approx(1.0, abs=1e-6)


def test_stored_level_is_the_papers_noise_level():
    sig = NoiseSchedule(flow_sigmas(10, 3.0), 0.7, "cpu").sigmas.double()
    psi = torch.linspace(0.9, 0.2, 10, dtype=torch.float64)            # a per-step noise level s_k, the paper's psi(k)
    a = levels_from_noise(psi, sig)                                    # what noise_schedule.json stores
    co = step_coefficients(sig, a, torch.arange(10), 1, "sde", dtype=torch.float64)
    dt = sig[1:] - sig[:-1]
    # the SDE step reads s_k = a_k f_k: its std is psi_k sqrt|dt_k|, exactly the step with noise level psi_k
    torch.testing.assert_close(co.std, psi * (-dt).sqrt())
    f = noise_scale(sig)
    # f_0 uses 1 - sigma_1 in the denominator (sigma_0 = 1), as the step does
    assert f[0].item() == pytest.approx((1.0 / (1.0 - sig[1].item())) ** 0.5)


def test_calibration_update_units():
    sig = NoiseSchedule(flow_sigmas(3, 3.0), 0.7, "cpu").sigmas.double()
    f = noise_scale(sig)
    a = torch.full((3,), 0.7, dtype=torch.float64)
    # step 0 balanced (2 vs 2) -> up; step 1 all negative -> down; step 2 3 vs 1 with eps1 = 2 -> down
    gains = torch.tensor([[1.0, -1, 1], [-1, -1, 1], [1, -1, 1], [-1, -1, -1]], dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    # level units (the default): a_k moves by eps2, so s_k moves by eps2 f_k
    new = update_levels(a, gains, 2.0, 0.01)
    torch.testing.assert_close(new, a + 0.01 * sign)
    torch.testing.assert_close(new * f - a * f, 0.01 * sign * f)
    # noise units (Algorithm 1 as written): s_k moves by eps2
    new = update_levels(a, gains, 2.0, 0.01, f)
    torch.testing.assert_close(new * f - a * f, 0.01 * sign)
