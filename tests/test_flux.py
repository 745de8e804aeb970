"""What is FLUX.1's own beyond the family contract (tests/test_families.py): its folder checks, its schedule and
packing against diffusers, ops on packed latents, graph replay."""
import json
import os

import pytest
import torch

from densegrpo_fast.config import ModelConfig, TinyModelConfig
from densegrpo_fast.models import build_models
from densegrpo_fast.models.base import ModelFolderError
from densegrpo_fast.models.flux import flux_sigmas, pack, unpack
from densegrpo_fast.rollout.sampler import GuidedVelocity

WORDS = ["a", "red", "blue", "green", "circle", "square"]


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    from densegrpo_fast.models.flux import build_tiny_flux
    folder = str(tmp_path_factory.mktemp("flux") / "model")
    build_tiny_flux(folder, WORDS, TinyModelConfig(num_layers=1), seed=0)
    return folder


def test_folder_loads_as_flux_and_families_are_checked(tiny_flux_dir, tiny_model_dir):
    m = build_models(ModelConfig(path=tiny_flux_dir, max_sequence_length=8), "cpu")
    assert type(m.pipe).__name__ == "FluxPipeline" and m.family.name == "flux"
    assert m.latent_shape == (4, 16, 16) and m.resolution == 32
    c = m.text.encode(["a red circle", "blue square"])
    e, p = c.embeds, c.pooled
    assert e.shape == (2, 8, 32) and p.shape == (2, 32)
    with pytest.raises(ModelFolderError, match=r"holds a StableDiffusion3Pipeline .*model.family is 'flux'"):
        build_models(ModelConfig(path=tiny_model_dir, family="flux"), "cpu")
    with pytest.raises(ModelFolderError, match=r"holds a FluxPipeline .*model.family is 'sd3'"):
        build_models(ModelConfig(path=tiny_flux_dir, family="sd3"), "cpu")
    bad = os.path.join(os.path.dirname(tiny_flux_dir), "other")
    os.makedirs(bad, exist_ok=True)
    with open(os.path.join(bad, "model_index.json"), "w") as f:
        json.dump({"_class_name": "KandinskyPipeline"}, f)
    with pytest.raises(ModelFolderError, match=r"'KandinskyPipeline'; supported: FluxPipeline, QwenImagePipeline, StableDiffusion3"):
        build_models(ModelConfig(path=bad), "cpu")


def test_schedule_and_packing_match_diffusers():
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    s = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                        base_image_seq_len=256, max_image_seq_len=4096)
    for T, seq in [(6, 64), (10, 1024), (28, 4096)]:
        s.set_timesteps(sigmas=np.linspace(1.0, 1 / T, T), mu=calculate_shift(seq, 256, 4096, 0.5, 1.15))
        torch.testing.assert_close(flux_sigmas(T, seq), s.sigmas.float(), rtol=0, atol=2e-7)
    z = torch.randn(3, 4, 6, 10)
    packed = pack(z)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(z, 3, 4, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack(packed, 6, 10), z, rtol=0, atol=0)


def test_ops_are_layout_free_on_packed_latents():
    """The fused ops work per sample over flattened rows: the SDE step and its log-prob are the same on packed
    (B, tokens, 4C) and unpacked (B, C, h, w) latents."""
    from densegrpo_fast import ops
    g = torch.Generator().manual_seed(0)
    z, v, eps = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    sig, lv, k = flux_sigmas(6, 16), torch.full((6,), 0.9), torch.tensor([0, 2, 4])
    nxt, lp = ops.sde_step(z, v, sig, lv, k, eps)
    nxt_p, lp_p = ops.sde_step(pack(z), pack(v), sig, lv, k, pack(eps))
    torch.testing.assert_close(unpack(nxt_p, 8, 8), nxt, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lp_p, lp, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_equals_eager_on_flux(tiny_flux_dir):
    """The staircase through GraphedVelocity on the FLUX family: replays equal eager within fp32 tolerance."""
    from densegrpo_fast.rollout.completions import dense_rollout
    from densegrpo_fast.rollout.graphs import GraphedVelocity
    m = build_models(ModelConfig(path=tiny_flux_dir, max_sequence_length=8), "cuda")
    cond = m.text.conditioning(["a red circle", "blue square"])
    T = 4
    sig, lv = m.family.sigmas(T, 3.0, m.latent_shape, device="cuda"), torch.full((T,), 0.9, device="cuda")
    z0 = torch.randn(2, *m.latent_shape, device="cuda")
    gv = GraphedVelocity(GuidedVelocity(m.transformer, 3.5, family=m.family), warmup=0)
    g = torch.Generator(device="cuda")
    dense_rollout(gv, cond, z0, sig, lv, g.manual_seed(1))
    replay = dense_rollout(gv, cond, z0, sig, lv, g.manual_seed(1))
    eager = dense_rollout(GuidedVelocity(m.transformer, 3.5, family=m.family), cond, z0, sig, lv, g.manual_seed(1))
    assert len(gv.graphs) == T
    torch.testing.assert_close(replay.completions, eager.completions, rtol=1e-4, atol=1e-4)
