"""DenseGRPO credit variants on hand-made sequences: reward-to-go, a global std, the mask of early steps.
The expected numbers are derived in the comments (eps = 1e-4 in the normalisations' denominators)."""
import pytest
import torch

from densegrpo_fast.config import ConfigError, load_config
from densegrpo_fast.credit import CreditMethod, from_step_mask, make_credit
from densegrpo_fast.rollout.driver import RolloutResult
from densegrpo_fast.credit.dense import GainAdvantages, global_std_advantages, reward_to_go

# two groups of two trajectories, T = 2: columns Q_0, Q_1, Q_2 = Q_T
Q = torch.tensor([[0.0, 0.5, 0.5],
                  [0.0, 0.0, 1.0],
                  [0.5, 0.5, 0.5],
                  [0.5, 1.0, 0.5]])
GROUPS = torch.tensor([0, 0, 1, 1])
TC = load_config(None, []).train


def test_reward_to_go_values():
    # Q_T - Q_k for k = 0, 1
    assert reward_to_go(Q).tolist() == [[0.5, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, -0.5]]
    # scored steps 0 and 2 of T = 3 (score_stride 2): Q = (Q_0, Q_2, Q_T) = (.2, .6, 1); steps 0, 1 belong to the
    # segment starting at 0 -> 1 - .2 = .8, step 2 to the one starting at 2 -> 1 - .6 = .4
    assert reward_to_go(torch.tensor([[0.2, 0.6, 1.0]]), [0, 2], 3) == pytest.approx(torch.tensor([[0.8, 0.8, 0.4]]))


def test_reward_to_go_advantages():
    A, _ = GainAdvantages(5.0, target="to_go")(Q, GROUPS, TC)
    # per (group, step) on Q_T - Q_k: group 0 step 0 [.5, 1] (mean .75, std .25) -> [-1, 1]; step 1 [0, 1] -> [-1, 1];
    # group 1 step 0 [0, 0] (std 0) -> [0, 0]; step 1 [0, -.5] (mean -.25, std .25) -> [1, -1]
    expect = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 1.0], [0.0, -1.0]])
    assert A == pytest.approx(expect, abs=1e-3)
    # the paper's gains instead: g = [[.5, 0], [0, 1], [0, 0], [.5, -.5]] -> [[1, -1], [-1, 1], [-1, 1], [1, -1]]
    A_gain, _ = GainAdvantages(5.0)(Q, GROUPS, TC)
    assert A_gain == pytest.approx(torch.tensor([[1.0, -1.0], [-1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]]), abs=1e-3)


def test_global_std_advantages():
    g = Q[:, 1:] - Q[:, :-1]
    # centred per (group, step): [[.25, -.5], [-.25, .5], [-.25, .25], [.25, -.25]]
    # one std over all 8: sqrt((4 x .0625 + 2 x .25 + 2 x .0625) / 8) = sqrt(.109375) = .33072
    c = torch.tensor([[0.25, -0.5], [-0.25, 0.5], [-0.25, 0.25], [0.25, -0.25]])
    sd = 0.109375 ** 0.5
    A = global_std_advantages(g, GROUPS)
    assert A == pytest.approx(c / (sd + 1e-4), abs=1e-6)
    # group 0's larger spread at step 1 keeps its larger advantages (1.51 against 0.76), which per-step unit
    # normalisation erases (both +-1)
    assert A[1, 1].item() == pytest.approx(0.5 / (sd + 1e-4), abs=1e-6)
    A2, _ = GainAdvantages(5.0, norm="global")(Q, GROUPS, TC)
    assert torch.equal(A2, A)
    assert torch.equal(global_std_advantages(torch.ones(4, 2), GROUPS), torch.zeros(4, 2))  # nothing to prefer


def test_from_step_mask():
    assert from_step_mask(None, (2, 4), 0) is None
    assert from_step_mask(None, (2, 4), 2).tolist() == [[False, False, True, True]] * 2
    m = torch.tensor([[True, False, True, False], [True, True, True, True]])
    assert from_step_mask(m, (2, 4), 2).tolist() == [[False, False, True, False], [False, False, True, True]]


class _Sampler:
    def rollout(self, ctx, local_ids, epoch):
        return RolloutResult(torch.zeros(2, 4, 1), torch.zeros(2, 3), torch.zeros(3), None)


def test_credit_method_applies_the_mask_and_options():
    cfg = load_config(None, ["credit.method=dense", "credit.dense_target=to_go", "credit.dense_norm=global",
                             "credit.train_from_step=1", "sampling.steps=3"])
    res = CreditMethod(cfg, None, _Sampler(), None).rollout(None, torch.arange(2), 0)
    assert res.train_mask.tolist() == [[False, True, True]] * 2
    from densegrpo_fast.rollout.schedule import NoiseSchedule, flow_sigmas
    scorer = make_credit(cfg, NoiseSchedule(flow_sigmas(3, 3.0), 0.7, "cpu")).scorer
    assert (scorer.target, scorer.norm) == ("to_go", "global")
    default = make_credit(load_config(None, ["credit.method=dense"]), NoiseSchedule(flow_sigmas(10, 3.0), 0.7, "cpu")).scorer
    assert (default.target, default.norm) == ("gain", "group_step")


def test_config_checks():
    with pytest.raises(ConfigError, match="dense_target"):
        load_config(None, ["credit.method=sparse", "credit.dense_target=to_go"])
    with pytest.raises(ConfigError, match="train_from_step"):
        load_config(None, ["sampling.steps=4", "credit.train_from_step=4"])
    with pytest.raises(ConfigError):
        load_config(None, ["credit.dense_norm=batch"])
