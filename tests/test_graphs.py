"""CUDA-graph rollout: the CPU fallback is the eager path; on a GPU the replayed graphs equal eager and the captured
step makes no host sync (torch.cuda.set_sync_debug_mode("error"))."""
import pytest
import torch
from diffusers import SD3Transformer2DModel

from densegrpo_fast.rollout.graphs import GraphedSDEStep, GraphedVelocity, graphed_sde_rollout
from densegrpo_fast.rollout.sampler import Conditioning, GuidedVelocity, sde_rollout
from densegrpo_fast.rollout.schedule import flow_sigmas


def _setup(device, dtype=torch.float32):
    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8).to(device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    B = 3
    cond = Conditioning(*(torch.randn(*s, generator=g).to(device, dtype) for s in ((B, 3, 16), (B, 8), (B, 3, 16),
                                                                                   (B, 8))))
    z0 = torch.randn(B, 4, 8, 8, generator=g).to(device)
    return m, cond, z0


def test_cpu_fallback_is_the_eager_rollout():
    m, cond, z0 = _setup("cpu")
    sig, lv = flow_sigmas(6), torch.full((6,), 0.7)
    step = GraphedSDEStep(GuidedVelocity(m, 3.0), sig, lv)
    lat, lp = graphed_sde_rollout(step, cond, z0, torch.Generator().manual_seed(5))
    ref = sde_rollout(GuidedVelocity(m, 3.0), cond, z0, sig, lv, torch.Generator().manual_seed(5))
    torch.testing.assert_close(lat, ref.latents)
    torch.testing.assert_close(lp, ref.log_probs)
    gv = GraphedVelocity(GuidedVelocity(m, 3.0))
    t = torch.full((3,), 500.0)
    torch.testing.assert_close(gv(z0, t, cond), GuidedVelocity(m, 3.0)(z0, t, cond))
    assert gv.graphs == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_equals_eager_and_does_not_sync():
    m, cond, z0 = _setup("cuda")
    sig, lv = flow_sigmas(6, device="cuda"), torch.full((6,), 0.7, device="cuda")
    vel = GuidedVelocity(m, 3.0)
    step = GraphedSDEStep(vel, sig, lv)
    g = torch.Generator(device="cuda")
    lat, lp = graphed_sde_rollout(step, cond, z0, g.manual_seed(5))      # captures on the first step
    assert len(step.graphs) == 1
    ref = sde_rollout(GuidedVelocity(m, 3.0), cond, z0, sig, lv, g.manual_seed(5))
    torch.testing.assert_close(lat, ref.latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lp, ref.log_probs, rtol=1e-4, atol=1e-4)
    assert vel.nfe == 2 * 3 * 6                                          # replays count their NFEs
    k = torch.zeros(3, dtype=torch.long, device="cuda")
    eps = torch.randn_like(z0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(z0, k, eps, cond)                                          # replay: no host sync allowed
    finally:
        torch.cuda.set_sync_debug_mode("default")
