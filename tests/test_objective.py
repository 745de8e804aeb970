"""The objective's plain functions (train/objective.py) on hand-made inputs, without a trainer: trained pairs, padding
to a given micro-step count, optimizer windows and their normalisation, the loss call and its statistics."""
import math

import pytest
import torch

from densegrpo_fast.ops import reference
from densegrpo_fast.train import objective as O


def test_pairs_follow_the_mask_the_trained_steps_and_the_generator():
    adv = torch.tensor([[1.0, 0.0, 2.0, 5.0], [0.0, 3.0, 0.0, 5.0]])
    every = O.select_pairs(None, adv, 3, False, torch.Generator().manual_seed(0))
    assert sorted(map(tuple, every.tolist())) == [(i, k) for i in range(2) for k in range(3)]   # steps k < 3 only
    again = O.select_pairs(None, adv, 3, False, torch.Generator().manual_seed(0))
    assert torch.equal(every, again)                                     # the order is the generator's permutation
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    want = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])[order]
    assert torch.equal(every, want)
    nz = O.select_pairs(None, adv, 3, True, torch.Generator().manual_seed(1))
    assert sorted(map(tuple, nz.tolist())) == [(0, 0), (0, 2), (1, 1)]   # zero advantages dropped
    mask = torch.tensor([[True, False, False, True], [False, False, True, True]])
    masked = O.select_pairs(mask, adv, 3, False, torch.Generator().manual_seed(2))
    assert sorted(map(tuple, masked.tolist())) == [(0, 0), (1, 2)]
    assert mask.sum() == 4                                               # the rollout's mask is not modified


def test_pairs_of_one_state_are_side_by_side():
    """Rows 0-1 and rows 2-3 share their states (TempFlow-GRPO's branches of one z_k): after selection the pairs of
    one (state, step) are consecutive, in the order of their first appearance."""
    mask = torch.zeros(4, 2, dtype=torch.bool)
    mask[:, 0] = True
    mask[[0, 1], 1] = True
    states = torch.tensor([0, 0, 2, 2])
    for seed in range(5):
        pairs = O.select_pairs(mask, torch.ones(4, 2), 2, False, torch.Generator().manual_seed(seed), states)
        keys = [(int(states[i]), k) for i, k in pairs.tolist()]
        assert len(pairs) == 6 and all(keys.index(x) == n or keys[n - 1] == x for n, x in enumerate(keys))
    i, k, inv = O.distinct_states(states, torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 0, 1]))
    assert i.tolist() == [0, 2, 0] and k.tolist() == [0, 0, 1] and inv.tolist() == [0, 0, 1, 2]
    assert O.distinct_states(None, torch.tensor([0]), torch.tensor([1]))[2] is None


def test_padding_to_a_given_micro_step_count():
    pairs = torch.tensor([[3, 1], [0, 2], [1, 0], [2, 2], [0, 0]])
    assert O.micro_steps(5, 4) == 2 and O.micro_steps(8, 4) == 2 and O.micro_steps(0, 4) == 0
    padded, valid = O.pad_pairs(pairs, 3, 4)                             # the ranks agreed on 3 micro-steps of 4
    assert padded.shape == (12, 2) and valid.tolist() == [True] * 5 + [False] * 7
    assert torch.equal(padded[:5], pairs) and (padded[5:] == pairs[0]).all()   # zero-weight repeats of a real pair
    exact, v = O.pad_pairs(pairs[:4], 1, 4)
    assert torch.equal(exact, pairs[:4]) and v.all()
    none, v = O.pad_pairs(torch.zeros(0, 2, dtype=torch.long), 2, 3)     # a rank without pairs still runs 2 steps
    assert none.shape == (6, 2) and not v.any() and (none == 0).all()


def test_optimizer_windows_and_boundaries():
    valid = torch.tensor([True] * 17 + [False] * 3)                      # 5 micro-steps of 4
    window, per = O.optimizer_windows(valid, 4, 2)
    assert window == 3 and per.tolist() == [12, 5]                       # windows of 3 and 2 micro-steps
    assert [m for m in range(5) if O.is_boundary(m, 5, window)] == [2, 4]
    window, per = O.optimizer_windows(valid, 4, 8)                       # more steps asked than micro-steps
    assert window == 1 and per.tolist() == [4, 4, 4, 4, 1]
    assert all(O.is_boundary(m, 5, 1) for m in range(5))
    window, per = O.optimizer_windows(valid, 4, 1)
    assert window == 5 and per.tolist() == [17] and [m for m in range(5) if O.is_boundary(m, 5, 5)] == [4]


def test_window_normalisation_sums_to_the_mean_over_the_windows_valid_pairs_of_all_ranks():
    """Two ranks, micro-batch 3, one window: sum over ranks and micro-steps of (micro-batch loss x window_scale),
    divided by the world (DeepSpeed's average), is the mean of w_i L_i over the window's valid pairs of both ranks,
    whatever the padding."""
    mb, world = 3, 2
    g = torch.Generator().manual_seed(0)
    per_rank = [torch.randn(5, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)]
    n_micro = max(O.micro_steps(x.numel(), mb) for x in per_rank)        # the agreed count: 2
    counts, total = [], 0.0
    for L in per_rank:
        _, valid = O.pad_pairs(torch.zeros(L.numel(), 2, dtype=torch.long), n_micro, mb)
        window, per = O.optimizer_windows(valid, mb, 1)
        counts.append(per)
    n_valid = sum(counts)                                                # what the ranks' all-reduce gives
    assert n_valid.tolist() == [7]
    for L in per_rank:
        _, valid = O.pad_pairs(torch.zeros(L.numel(), 2, dtype=torch.long), n_micro, mb)
        Lp = torch.cat([L, torch.full((n_micro * mb - L.numel(),), 123.0, dtype=torch.float64)])  # padding: any value
        for m in range(n_micro):
            w = valid[m * mb:(m + 1) * mb].double()
            total += (w * Lp[m * mb:(m + 1) * mb]).mean() * O.window_scale(mb, world, n_valid[0])
    assert math.isclose(total / world, float(torch.cat(per_rank).mean()), rel_tol=1e-12)
    assert O.window_scale(4, 1, 0) == 4.0                                # an empty window divides by 1, not 0


def test_the_loss_weights_padding_zero_and_multiplies_the_step_weights():
    g = torch.Generator().manual_seed(3)
    lp, old = torch.randn(4, generator=g), torch.randn(4, generator=g)
    adv, kl = torch.randn(4, generator=g), torch.rand(4, generator=g)
    ok, k = torch.tensor([True, True, True, False]), torch.tensor([0, 1, 2, 0])
    step_w = torch.tensor([0.5, 1.0, 1.5])
    got = O.pair_loss(lp, old, adv, ok, k, step_w, 0.2, kl, 0.1)
    want, _, _ = reference.grpo_loss(lp, old, adv, torch.tensor([0.5, 1.0, 1.5, 0.0]), 0.2, kl, 0.1)
    torch.testing.assert_close(got, want)
    plain = O.pair_loss(lp, old, adv, ok, k, None, 0.2, kl, 0.1)
    torch.testing.assert_close(plain, reference.grpo_loss(lp, old, adv, ok.float(), 0.2, kl, 0.1)[0])


def test_statistics_are_means_over_the_valid_pairs():
    """Two micro-batches of 2, the last pair padding: loss, KL, clip fraction, approx KL and the KL per step are means
    over the 3 valid pairs; ratio_dev_first is the first micro-batch's largest |rho - 1|."""
    st = O.LossStatistics(steps=3, mb=2, clip_range=0.1, device="cpu")
    lp = [torch.tensor([0.0, 0.2]), torch.tensor([-0.05, 7.0])]
    old = [torch.zeros(2), torch.zeros(2)]
    kl = [torch.tensor([1.0, 2.0]), torch.tensor([4.0, 100.0])]
    ok = [torch.tensor([True, True]), torch.tensor([True, False])]
    k = [torch.tensor([0, 2]), torch.tensor([2, 1])]
    losses = [torch.tensor(0.3), torch.tensor(0.5)]                      # micro-batch means over mb = 2 pairs
    for m in range(2):
        st.add(losses[m], lp[m], old[m], kl[m], ok[m], k[m])
    out = st.metrics(total_pairs=12)
    assert out["loss"] == pytest.approx((0.3 * 2 + 0.5 * 2) / 3)
    assert out["kl"] == pytest.approx((1 + 2 + 4) / 3)
    assert out["clipfrac"] == pytest.approx(1 / 3)                       # only rho = e^0.2 is outside 1 +- 0.1
    assert out["approx_kl"] == pytest.approx((0.2 ** 2 + 0.05 ** 2) / 2 / 3)
    assert out["ratio_dev_first"] == pytest.approx(math.exp(0.2) - 1)
    assert out["trained_fraction"] == pytest.approx(3 / 12)
    assert out["kl_per_step"] == pytest.approx([1.0, 0.0, (2 + 4) / 2])  # step 1 had only padding
    twice = st.metrics(12, reduce=lambda t: 2 * t, agree_max=lambda x: x + 1)  # e.g. two identical ranks
    assert twice["loss"] == pytest.approx(out["loss"]) and twice["trained_fraction"] == pytest.approx(6 / 12)
    assert twice["ratio_dev_first"] == pytest.approx(out["ratio_dev_first"] + 1)
