"""Credit assignment by hand: gains telescope, turning points with/without the constraint, balancing,
TempFlow-GRPO noise-aware weights."""
import torch

from densegrpo_fast.credit.dense import step_gains, turning_point_rewards, turning_points


def test_gains_telescope():
    q = torch.randn(7, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = step_gains(q)
    torch.testing.assert_close(g.sum(1), q[:, -1] - q[:, 0])


def test_turning_points_by_hand():
    # Q = [0, 1, 0.5, 2]: d = [1, -0.5, 1.5], overall trend + -> s = [+, -, +]
    # step 2: s1 < 0 < s2 -> turning point; constraint: sign(d2)=+ == sign(Q_T - Q_2 = 1.5)=+ -> kept.
    # step 0: sign(d0) * sign(Q_T - Q_1 = 1) > 0 -> turning point.  step 1: s0 > 0 -> not.
    q = torch.tensor([[0.0, 1.0, 0.5, 2.0]])
    assert turning_points(q).tolist() == [[True, False, True]]
    # Q = [0, 1, 0.5, 0.6, 0.2]: trend + (0.2 > 0); d = [1, -.5, .1, -.4]; s = [+, -, +, -]
    # step 2: s1 < 0 < s2 -> candidate; constraint sign(d2)=+ vs sign(Q_T - Q_2 = -0.3)=- -> rejected with it.
    # step 0: sign(d0)=+ * sign(Q_T - Q_1 = -0.8)=- < 0 -> not a turning point.
    q = torch.tensor([[0.0, 1.0, 0.5, 0.6, 0.2]])
    assert turning_points(q, constraint=True).tolist() == [[False, False, False, False]]
    assert turning_points(q, constraint=False).tolist() == [[False, False, True, False]]


def test_turning_point_rewards_and_balancing():
    # row 0: turning points at steps 0 and 2 (as above), both with Q_T - Q_k > 0: 2 and 1.5
    # row 1: mirrored (all negated): turning points at 0 and 2 with Q_T - Q_k < 0: -2, -1.5
    # row 2: one more positive turning point: Q = [0, 3, 1, 4] -> d = [3, -2, 3]; Q_T - Q_0 = 4, Q_T - Q_2 = 3
    q = torch.tensor([[0.0, 1.0, 0.5, 2.0], [0.0, -1.0, -0.5, -2.0], [0.0, 3.0, 1.0, 4.0]])
    r, tp = turning_point_rewards(q, balance=False)
    assert tp.sum() == 6
    torch.testing.assert_close(r[0], torch.tensor([2.0, -0.5, 1.5]))
    # balanced: 4 positive vs 2 negative -> keep the 2 largest positives (4 and 3, both row 2) and both negatives
    r, tp = turning_point_rewards(q, balance=True)
    assert tp.tolist() == [[False, False, False], [True, False, True], [True, False, True]]
    torch.testing.assert_close(r[0], step_gains(q)[0])          # row 0 reverted to d_k
    torch.testing.assert_close(r[2], torch.tensor([4.0, -2.0, 3.0]))
