"""Credit assignment by hand: gains telescope, turning points with/without the constraint, balancing,
TempFlow-GRPO noise-aware weights."""
import pytest
import torch

from densegrpo_fast.credit.dense import step_gains
from densegrpo_fast.credit.turning_point import turning_point_rewards, turning_points


def test_gains_telescope():
    q = torch.randn(7, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = step_gains(q)
    torch.testing.assert_close(g.sum(1), q[:, -1] - q[:, 0])


def test_turning_points_by_hand():
    # Q = [0, 1, 0.5, 2]: d = [1, -0.5, 1.5], overall trend + -> s = [+, -, +]
    # step 2: s1 < 0 < s2 -> turning point; constraint: sign(d2)=+ == sign(Q_T - Q_2 = 1.5)=+ -> kept.
    # step 0: sign(d0) * sign(Q_T - Q_1 = 1) > 0 -> turning point.  step 1: s0 > 0 -> not.
    q = torch.tensor([[0.0, 1.0, 0.5, 2.0]])
    assert turning_points(q, rule="current").tolist() == [[True, False, True]]
    # public rule: step 2's constraint compares sign(d2) with sign(Q_T - Q_3) = 0 -> the last step never turns
    assert turning_points(q).tolist() == [[True, False, False]]
    # Q = [0, 1, 0.5, 0.6, 0.2]: trend + (0.2 > 0); d = [1, -.5, .1, -.4]; s = [+, -, +, -]
    # step 2: s1 < 0 < s2 -> candidate; constraint sign(d2)=+ vs sign(Q_T - Q_2 = -0.3)=- -> rejected with it.
    # step 0: sign(d0)=+ * sign(Q_T - Q_1 = -0.8)=- < 0 -> not a turning point.
    q = torch.tensor([[0.0, 1.0, 0.5, 0.6, 0.2]])
    assert turning_points(q, constraint=True, rule="current").tolist() == [[False, False, False, False]]
    assert turning_points(q, constraint=False).tolist() == [[False, False, True, False]]
    # public rule: step 2's constraint uses Q_T - Q_3 = 0.2 - 0.6 = -0.4 (the change after the step): sign - vs + ->
    # rejected as well; a sequence where the two rules differ:
    # Q = [0, 1, 0.5, 0.7, 1.2, 2]: trend +; d = [1, -.5, .2, .5, .8]; s = [+, -, +, +, +]; step 2 is a candidate.
    # current: sign(d2)=+ vs sign(Q_T - Q_2 = 1.5)=+ -> kept; next: vs sign(Q_T - Q_3 = 1.3)=+ -> kept.
    # Q = [0, 1, 0.5, 2.5, 2.4, 2]: d = [1, -.5, 2, -.1, -.4]; s = [+, -, +, -, -]; step 2 candidate.
    # current: sign(Q_T - Q_2 = 1.5)=+ == + -> kept; next: sign(Q_T - Q_3 = -0.5)=- != + -> rejected.
    q = torch.tensor([[0.0, 1.0, 0.5, 2.5, 2.4, 2.0]])
    assert turning_points(q, rule="current").tolist() == [[True, False, True, False, False]]
    assert turning_points(q, rule="next").tolist() == [[True, False, False, False, False]]


def test_turning_point_rewards_and_balancing():
    # row 0: turning points at steps 0 and 2 (as above), both with Q_T - Q_k > 0: 2 and 1.5
    # row 1: mirrored (all negated): turning points at 0 and 2 with Q_T - Q_k < 0: -2, -1.5
    # row 2: one more positive turning point: Q = [0, 3, 1, 4] -> d = [3, -2, 3]; Q_T - Q_0 = 4, Q_T - Q_2 = 3
    q = torch.tensor([[0.0, 1.0, 0.5, 2.0], [0.0, -1.0, -0.5, -2.0], [0.0, 3.0, 1.0, 4.0]])
    r, tp = turning_point_rewards(q, balance=False, rule="current")
    assert tp.sum() == 6
    torch.testing.assert_close(r[0], torch.tensor([2.0, -0.5, 1.5]))
    # balanced: 4 positive vs 2 negative -> keep the 2 largest positives (4 and 3, both row 2) and both negatives
    r, tp = turning_point_rewards(q, balance=True, rule="current")
    assert tp.tolist() == [[False, False, False], [True, False, True], [True, False, True]]
    torch.testing.assert_close(r[0], step_gains(q)[0])          # row 0 reverted to d_k
    torch.testing.assert_close(r[2], torch.tensor([4.0, -2.0, 3.0]))
    # one sign missing (rows 0 and 2 only, all positive): the public code keeps them all, "drop" drops them all
    only_pos = q[[0, 2]]
    _, tp = turning_point_rewards(only_pos, balance=True, rule="current", missing="keep")
    assert tp.sum() == 4
    _, tp = turning_point_rewards(only_pos, balance=True, rule="current", missing="drop")
    assert tp.sum() == 0


def test_dense_zero_gain_option():
    """Gains [0, 0.5, 0] in one group: normalised like any value by default, advantage 0 with zero_gain=zero."""
    from densegrpo_fast.credit.dense import GainAdvantages
    from densegrpo_fast.config import TrainConfig
    q = torch.tensor([[0.0, 0.0], [0.0, 0.5], [0.0, 0.0]])         # T = 1: one step, three trajectories
    gid = torch.zeros(3, dtype=torch.long)
    A, _ = GainAdvantages(5.0)(q, gid, TrainConfig())
    torch.testing.assert_close(A[:, 0].float(), torch.tensor([-0.7071, 1.4142, -0.7071]), rtol=1e-3, atol=1e-3)
    A, _ = GainAdvantages(5.0, "zero")(q, gid, TrainConfig())
    assert A[0, 0] == 0 and A[2, 0] == 0 and A[1, 0] > 0


def test_segment_gains_by_hand():
    """credit.score_stride: Q scored at the segment starts and at T; every step of a segment gets its gain."""
    from densegrpo_fast.credit.dense import segment_gains
    from densegrpo_fast.rollout.completions import scored_steps
    assert scored_steps(4, 2) == [0, 2] and scored_steps(4, 3) == [0, 3] and scored_steps(5, 1) == [0, 1, 2, 3, 4]
    q = torch.tensor([[0.1, 0.5, 0.4]], dtype=torch.float64)       # Q_0, Q_2, Q_4 (T = 4, s = 2)
    torch.testing.assert_close(segment_gains(q, [0, 2], 4), torch.tensor([[0.4, 0.4, -0.1, -0.1]], dtype=torch.float64))
    q = torch.tensor([[0.0, 1.0, 0.25]], dtype=torch.float64)      # Q_0, Q_3, Q_4 (T = 4, s = 3)
    torch.testing.assert_close(segment_gains(q, [0, 3], 4), torch.tensor([[1.0, 1.0, 1.0, -0.75]], dtype=torch.float64))
    full = torch.rand(5, 7, dtype=torch.float64)                    # every step scored: the plain step gains
    torch.testing.assert_close(segment_gains(full, list(range(6)), 6), step_gains(full))


def test_stride_advantages_equal_the_per_step_rule_on_broadcast_gains():
    """GainAdvantages with a stride = per-step normalisation of the segment gains, the same value on every step of
    a segment (within a group)."""
    from densegrpo_fast.config import TrainConfig
    from densegrpo_fast.credit.advantages import per_timestep_advantages
    from densegrpo_fast.credit.dense import GainAdvantages, segment_gains
    g = torch.Generator().manual_seed(4)
    q = torch.rand(8, 4, generator=g, dtype=torch.float64)          # T = 7, s = 3: Q_0, Q_3, Q_6, Q_7
    gid = torch.arange(8) // 4
    A, stats = GainAdvantages(5.0, starts=[0, 3, 6], T=7)(q, gid, TrainConfig())
    assert A.shape == (8, 7) and len(stats["gain_mean"]) == 7
    torch.testing.assert_close(A, per_timestep_advantages(segment_gains(q, [0, 3, 6], 7), gid, 5.0))
    assert torch.equal(A[:, 0], A[:, 2]) and torch.equal(A[:, 3], A[:, 5]) and not torch.equal(A[:, 5], A[:, 6])


def test_score_stride_is_for_dense_only():
    from densegrpo_fast.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="credit.score_stride"):
        load_config("configs/tiny_jpeg.yaml", ["credit.method=turning_point", "credit.score_stride=2"])
    with pytest.raises(ConfigError, match="credit.score_stride"):
        load_config("configs/tiny_jpeg.yaml", ["credit.method=dense", "credit.score_stride=0"])
    assert load_config("configs/tiny_jpeg.yaml", ["credit.method=dense", "credit.score_stride=2"]).credit.score_stride == 2

def test_tempflow_noise_aware_weights():
    from densegrpo_fast.config import Config
    from densegrpo_fast.credit import noise_aware_weights
    from densegrpo_fast.rollout.schedule import NoiseSchedule, flow_sigmas
    cfg = Config()
    cfg.sampling.steps = 10
    w = noise_aware_weights(NoiseSchedule(flow_sigmas(10, 3.0), 0.7, "cpu"), cfg)
    trained = w[:9]                                   # floor(0.99 * 10) trained steps
    assert abs(trained.mean().item() - 1.0) < 1e-6    # mean-one over the trained steps
    # TempFlow-GRPO reports about 1.6 at the first steps down to about 0.5 at step 9 (SD3.5-M, 10 steps, shift 3)
    assert 1.5 < trained[0] < 1.7 and 0.45 < trained[-1] < 0.55
    # decreasing as sigma falls (after sigma = 1, whose s uses 1 - sigma_1 in the denominator)
    assert all(a > b for a, b in zip(trained[1:], trained[2:]))


def test_calibration_rule():
    from densegrpo_fast.credit.calibration import update_levels
    levels = torch.tensor([0.7, 0.7, 0.7])
    # step 0: 2 positive, 2 negative -> |0| < 2 -> up; step 1: 4 negative -> down; step 2: 3 vs 1 -> |2| not < 2 -> down
    gains = torch.tensor([[1.0, -1, 1], [-1, -1, 1], [1, -1, 1], [-1, -1, -1]])
    torch.testing.assert_close(update_levels(levels, gains, 2.0, 0.01), torch.tensor([0.71, 0.69, 0.69]))
    assert update_levels(torch.tensor([0.0]), torch.tensor([[1.0]]), 0.5, 0.01).item() == 0.0  # clamped at 0
    # auto threshold 1.96 sqrt(n_k): step 0 n=4 -> 3.92 (|0| balanced), step 1 n=4 (|4| not), step 2 |2| < 3.92
    torch.testing.assert_close(update_levels(levels, gains, "auto", 0.01), torch.tensor([0.71, 0.69, 0.71]))
    # a step whose gains are all exactly zero has imbalance 0: balanced (up) under both rules, as in the paper;
    # a single non-zero gain (imbalance 1 < 1.96) too
    zero_step = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    for eps1 in (2.0, "auto"):
        torch.testing.assert_close(update_levels(torch.tensor([0.7, 0.7]), zero_step, eps1, 0.01),
                                   torch.tensor([0.71, 0.71]))


def test_auto_threshold_recognises_balanced_steps():
    """Simulated balanced steps (N = 32 gains, each non-zero one positive with probability 1/2, a quarter exactly
    zero): the paper's eps1 = 2 calls them balanced rarely (counts must be exactly equal), the auto threshold about
    95 % of the time; a clearly unbalanced step (90 % positive) is still called unbalanced."""
    from densegrpo_fast.credit.calibration import balance_threshold
    g = torch.Generator().manual_seed(0)
    trials, N = 2000, 32

    def frac_balanced(p_pos, eps1):
        signs = torch.where(torch.rand(trials, N, generator=g) < p_pos, 1.0, -1.0)
        gains = signs * (torch.rand(trials, N, generator=g) > 0.25)     # some exact zeros
        hits = 0
        for t in range(trials):
            x = gains[t:t + 1].T                                        # (N, 1): one step
            imb = ((x > 0).sum(0) - (x < 0).sum(0)).abs().double()
            hits += bool(imb < balance_threshold(x, eps1))
        return hits / trials

    assert frac_balanced(0.5, 2.0) < 0.4
    assert frac_balanced(0.5, "auto") > 0.9
    assert frac_balanced(0.9, "auto") < 0.1

def test_calibrated_schedule_is_what_training_samples_with(tmp_path):
    import json

    import pytest

    from densegrpo_fast.config import load_config
    from densegrpo_fast.rollout.schedule import NoiseSchedule, flow_sigmas, load_noise_levels
    levels = [0.66, 0.68, 0.7, 0.72, 0.7, 0.66, 0.7, 0.74, 0.72, 0.74]
    path = tmp_path / "noise_schedule.json"
    path.write_text(json.dumps({"noise_levels": levels}))
    cfg = load_config(None, [f"sampling.noise_schedule_file={path}"])
    sched = NoiseSchedule(flow_sigmas(10, 3.0), 0.7, "cpu", load_noise_levels(cfg.sampling.noise_schedule_file, 10))
    torch.testing.assert_close(sched.noise_levels, torch.tensor(levels))
    with pytest.raises(ValueError, match="has 10 levels, sampling.steps=6"):
        load_noise_levels(str(path), 6)
    with pytest.raises(ValueError, match="cannot read"):
        load_noise_levels(str(tmp_path / "missing.json"), 10)
