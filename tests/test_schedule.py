import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from densegrpo_fast.rollout.schedule import flow_sigmas


def test_sigmas_match_diffusers_and_the_documented_table():
    for T in (10, 40, 7):
        s = FlowMatchEulerDiscreteScheduler(shift=3.0)
        s.set_timesteps(T)
        torch.testing.assert_close(flow_sigmas(T, 3.0), s.sigmas.float(), rtol=1e-6, atol=1e-6)
    doc = torch.tensor([1, .9601, .9133, .8577, .7904, .7073, .6022, .4649, .2780, .0089, 0])
    torch.testing.assert_close(flow_sigmas(10, 3.0), doc, atol=6e-5, rtol=0)
