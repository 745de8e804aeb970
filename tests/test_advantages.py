import torch

from densegrpo_fast.credit.advantages import group_advantages, per_timestep_advantages


def test_group_advantages_by_hand():
    # group 0: rewards 1, 3 -> mean 2, std (population) 1 -> A = -1, +1 (eps 1e-4 in the denominator)
    # group 1: rewards 5, 5 -> A = 0
    r = torch.tensor([1.0, 3.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 1, 1])
    a = group_advantages(r, g, "group")
    torch.testing.assert_close(a, torch.tensor([-1 / 1.0001, 1 / 1.0001, 0.0, 0.0]))
    # global std over [1,3,5,5]: mean 3.5, var = (6.25+0.25+2.25+2.25)/4 = 2.75
    a = group_advantages(r, g, "global")
    s = 2.75 ** 0.5 + 1e-4
    torch.testing.assert_close(a, torch.tensor([-1 / s, 1 / s, 0.0, 0.0]))


def test_clip():
    r = torch.tensor([0.0] * 99 + [1000.0])
    a = group_advantages(r, torch.zeros(100, dtype=torch.long), "group", clip=5.0)
    assert a.max().item() == 5.0


def test_per_timestep_normalisation():
    gains = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 1.0], [2.0, 3.0]])
    a = per_timestep_advantages(gains, torch.tensor([0, 0, 1, 1]))
    e = 1 / 1.0001
    torch.testing.assert_close(a, torch.tensor([[-e, 0.0], [e, 0.0], [0.0, -e], [0.0, e]]))
