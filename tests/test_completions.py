"""The staircase completion engine against a naive per-k loop (fp64), and the forward counts."""
import pytest
import torch

from densegrpo_fast.rollout.completions import completion_schedule, dense_rollout, naive_completions
from densegrpo_fast.rollout.sampler import GuidedVelocity, sde_rollout
from densegrpo_fast.rollout.schedule import flow_sigmas
from conftest import sd3_cond, sd3


def _cond(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return sd3_cond(torch.randn(B, 3, 16, generator=g, dtype=torch.float64),
                        torch.randn(B, 8, generator=g, dtype=torch.float64),
                        torch.randn(B, 3, 16, generator=g, dtype=torch.float64),
                        torch.randn(B, 8, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("n", [None, 1, 2, 3])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_staircase_equals_naive_loop_fp64(net, n, guidance):
    model, _ = net
    B, T = 3, 6
    sig = flow_sigmas(T).double()
    levels = torch.full((T,), 0.7, dtype=torch.float64)
    z0 = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cond = _cond(B)
    dr = dense_rollout(GuidedVelocity(model, guidance, sd3()), cond, z0, sig, levels, torch.Generator().manual_seed(3), n,
                       max_batch=5)
    # the main path is exactly the plain SDE rollout with the same noise
    plain = sde_rollout(GuidedVelocity(model, guidance, sd3()), cond, z0, sig, levels, torch.Generator().manual_seed(3))
    torch.testing.assert_close(dr.trajectory.latents, plain.latents, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dr.trajectory.log_probs, plain.log_probs, rtol=1e-10, atol=1e-10)
    naive = naive_completions(GuidedVelocity(model, guidance, sd3()), cond, dr.trajectory.latents, sig, n)
    assert (dr.completions - naive).abs().max().item() < 1e-6
    assert torch.isfinite(dr.completions).all()


@pytest.mark.parametrize("n", [None, 1, 2])
@pytest.mark.parametrize("stride", [2, 3])
def test_strided_staircase_equals_naive_loop_and_saves_forwards(net, n, stride):
    """credit.score_stride: completions from k = 0, s, 2s, ... only: equal to the naive loop at those starts, the
    main path unchanged, and only their forwards are run."""
    from densegrpo_fast.rollout.completions import scored_steps
    model, calls = net
    B, T = 3, 7
    sig = flow_sigmas(T).double()
    levels = torch.full((T,), 0.7, dtype=torch.float64)
    z0 = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    starts = scored_steps(T, stride)
    calls.clear()
    dr = dense_rollout(GuidedVelocity(model, 3.0, sd3()), _cond(B), z0, sig, levels, torch.Generator().manual_seed(6), n,
                       max_batch=4, starts=starts)
    counted = sum(calls)
    full = dense_rollout(GuidedVelocity(model, 3.0, sd3()), _cond(B), z0, sig, levels, torch.Generator().manual_seed(6), n)
    torch.testing.assert_close(dr.trajectory.latents, full.trajectory.latents, rtol=1e-10, atol=1e-10)
    assert dr.completions.shape[1] == len(starts)
    naive = naive_completions(GuidedVelocity(model, 3.0, sd3()), _cond(B), dr.trajectory.latents, sig, n, starts)
    assert (dr.completions - naive).abs().max().item() < 1e-6
    torch.testing.assert_close(dr.completions, full.completions[:, starts], rtol=1e-9, atol=1e-9)
    new = B * sum(len(completion_schedule(sig, k, n)) - 2 for k in starts)
    assert counted == 2 * (B * T + new) and dr.new_nfe == 2 * new

@pytest.mark.parametrize("n", [None, 1, 2])
def test_forward_counts_match_the_formula(net, n):
    model, calls = net
    B, T = 2, 5
    sig = flow_sigmas(T).double()
    calls.clear()
    vel = GuidedVelocity(model, 4.5, sd3())
    dr = dense_rollout(vel, _cond(B), torch.randn(B, 4, 8, 8, dtype=torch.float64), sig,
                       torch.full((T,), 0.7, dtype=torch.float64), torch.Generator().manual_seed(0), n)
    counted = sum(calls)                          # samples through the network, CFG doubles each
    if n is None:
        new = B * T * (T - 1) // 2                # T(T-1)/2 new forwards per trajectory, not T(T+1)/2
        assert dr.forwards == [B * (1 + j) for j in range(T)]  # the staircase
    else:
        new = B * sum(len(completion_schedule(sig, k, n)) - 2 for k in range(T))
    assert counted == 2 * (B * T + new)
    assert dr.new_nfe == 2 * new and vel.nfe == counted
    if n == 1:
        assert new == 0                           # one-shot x0 prediction reuses the SDE step's velocity


def test_completion_schedule():
    sig = flow_sigmas(10)
    assert completion_schedule(sig, 3, None) == list(range(3, 11))
    assert completion_schedule(sig, 3, 1) == [3, 10]
    # n = 2 from k = 3 to T = 10: linspace(3, 10, 3) = [3, 6.5, 10]; torch.round is half-to-even, 6.5 -> 6
    assert completion_schedule(sig, 3, 2) == [3, 6, 10]
    assert completion_schedule(sig, 2, 3) == [2, 5, 7, 10]     # linspace(2, 10, 4) = [2, 4.67, 7.33, 10]
    assert completion_schedule(sig, 9, 4) == [9, 10]
