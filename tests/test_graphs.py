"""CUDA-graph rollout: the CPU fallback is the eager path; on a GPU the replayed graphs equal eager and the captured
step makes no host sync (torch.cuda.set_sync_debug_mode("error"))."""
import pytest
import torch
from diffusers import SD3Transformer2DModel

from densegrpo_fast.rollout.graphs import GraphedVelocity
from densegrpo_fast.rollout.sampler import GuidedVelocity, sde_rollout
from densegrpo_fast.rollout.schedule import flow_sigmas
from conftest import sd3_cond, sd3


def _setup(device, dtype=torch.float32):
    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8).to(device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    B = 3
    cond = sd3_cond(*(torch.randn(*s, generator=g).to(device, dtype) for s in ((B, 3, 16), (B, 8), (B, 3, 16),
                                                                                   (B, 8))))
    z0 = torch.randn(B, 4, 8, 8, generator=g).to(device)
    return m, cond, z0


def test_cpu_fallback_rollout_follows_the_fp64_step_formula():
    """On the CPU the graphed velocity runs eagerly; each transition of the rollout through it must equal the SDE
    step written by hand in fp64 (tests/fp64_formulas.py) from the same velocity and noise, and its log-prob that of
    the Gaussian."""
    from fp64_formulas import logprob, sde_mean_std
    m, cond, z0 = _setup("cpu", torch.float64)
    z0 = z0.double()
    sig, lv = flow_sigmas(6).double(), torch.full((6,), 0.7, dtype=torch.float64)
    vel = GuidedVelocity(m, 3.0, sd3())
    traj = sde_rollout(GraphedVelocity(vel, warmup=0), cond, z0, sig, lv, torch.Generator().manual_seed(5))
    lat, lp = traj.latents, traj.log_probs
    g = torch.Generator().manual_seed(5)
    for k in range(6):
        eps = torch.randn(z0.shape, generator=g).double()
        v = vel(lat[:, k], sig[k].expand(3), cond)
        mean, std, _ = sde_mean_std(lat[:, k], v, sig, k, 0.7, "sde")
        torch.testing.assert_close(lat[:, k + 1], mean + std * eps, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lp[:, k], logprob(lat[:, k + 1], mean, std), rtol=1e-9, atol=1e-9)
    gv = GraphedVelocity(GuidedVelocity(m, 3.0, sd3()))
    t = torch.full((3,), 500.0, dtype=torch.float64)
    vu, vc = m(hidden_states=torch.cat([z0, z0]), timestep=torch.cat([t, t]),
               encoder_hidden_states=torch.cat([cond.neg_embeds, cond.embeds]),
               pooled_projections=torch.cat([cond.neg_pooled, cond.pooled]), return_dict=False)[0].chunk(2)
    torch.testing.assert_close(gv(z0, t / 1000.0, cond), vu + 3.0 * (vc - vu), rtol=1e-12, atol=1e-12)  # CFG by hand
    assert gv.graphs == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_equals_eager_and_does_not_sync():
    """The SDE rollout through GraphedVelocity (what training samples with): two eager warm-up steps, a capture on
    the third, replays after; equal to the eager rollout, NFEs counted, and a whole replayed rollout makes no host
    sync."""
    m, cond, z0 = _setup("cuda")
    sig, lv = flow_sigmas(6, device="cuda"), torch.full((6,), 0.7, device="cuda")
    vel = GuidedVelocity(m, 3.0, sd3())
    gv = GraphedVelocity(vel, warmup=2)
    g = torch.Generator(device="cuda")
    got = sde_rollout(gv, cond, z0, sig, lv, g.manual_seed(5))          # captures on the third step
    assert len(gv.graphs) == 1
    ref = sde_rollout(GuidedVelocity(m, 3.0, sd3()), cond, z0, sig, lv, g.manual_seed(5))
    torch.testing.assert_close(got.latents, ref.latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.log_probs, ref.log_probs, rtol=1e-4, atol=1e-4)
    assert vel.nfe == 2 * 3 * 6                                          # replays count their NFEs
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = sde_rollout(gv, cond, z0, sig, lv, g.manual_seed(5))    # replays only: no host sync allowed
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(again.latents, ref.latents, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_staircase_replay_equals_eager_for_every_shape_with_one_pool():
    """The dense rollout through GraphedVelocity: one graph per staircase shape B(1+j), all from the shared pool;
    replays (no host sync allowed) equal the eager staircase within fp32 tolerance, while a second thread works on
    the device (the reward thread's decodes) during capture."""
    import threading
    from densegrpo_fast.rollout import graphs
    from densegrpo_fast.rollout.completions import dense_rollout
    m, cond, z0 = _setup("cuda")
    T = 5
    sig, lv = flow_sigmas(T, device="cuda"), torch.full((T,), 0.7, device="cuda")
    gv = GraphedVelocity(GuidedVelocity(m, 3.0, sd3()), warmup=0)
    stop = threading.Event()

    def busy():  # another thread's device work while the main thread captures (thread-local capture mode)
        x = torch.randn(256, 256, device="cuda")
        while not stop.is_set():
            x = (x @ x).tanh()
        torch.cuda.synchronize()

    t = threading.Thread(target=busy)
    t.start()
    try:
        g = torch.Generator(device="cuda")
        first = dense_rollout(gv, cond, z0, sig, lv, g.manual_seed(2))     # captures every shape
    finally:
        stop.set()
        t.join()
    assert len(gv.graphs) == T and graphs._POOL is not None
    torch.cuda.set_sync_debug_mode("error")
    try:
        replay = dense_rollout(gv, cond, z0, sig, lv, g.manual_seed(2))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager = dense_rollout(GuidedVelocity(m, 3.0, sd3()), cond, z0, sig, lv, g.manual_seed(2))
    for got in (first, replay):
        torch.testing.assert_close(got.completions, eager.completions, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.trajectory.latents, eager.trajectory.latents, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.trajectory.log_probs, eager.trajectory.log_probs, rtol=1e-4, atol=1e-4)
