"""The FLUX.1 family behind the model seam: a tiny FluxPipeline built from configs, saved as a diffusers folder and
loaded through the same path as a real checkpoint; our sampler equals FluxPipeline's own; packing, schedule,
staircase and LoRA export."""
import json
import os

import pytest
import torch

from densegrpo_fast.config import ModelConfig, TinyModelConfig
from densegrpo_fast.models import build_models
from densegrpo_fast.models.base import ModelFolderError
from densegrpo_fast.models.flux import FluxFamily, flux_sigmas, pack, unpack
from densegrpo_fast.rollout.sampler import GuidedVelocity, ode_sample
from conftest import PY, ROOT

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


def test_our_ode_sampler_equals_flux_pipeline(tiny_flux_dir):
    """Euler sampling through the seam (schedule, packing, position ids, guidance embedding, timestep / 1000) equals
    FluxPipeline's own denoising loop on the same latents and embeddings."""
    m = build_models(ModelConfig(path=tiny_flux_dir, max_sequence_length=8), "cpu")
    cond = m.text.conditioning(["a red circle", "green square"])
    e, p = cond.embeds, cond.pooled
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    T = 5
    out = m.pipe(prompt_embeds=e, pooled_prompt_embeds=p, latents=pack(z0), num_inference_steps=T,
                 guidance_scale=3.5, height=32, width=32, output_type="latent", return_dict=False)[0]
    sig = m.family.sigmas(T, 3.0, m.latent_shape, m.pipe.scheduler.config)
    ours = ode_sample(GuidedVelocity(m.transformer, 3.5, m.family), cond, z0, sig)
    torch.testing.assert_close(pack(ours), out, rtol=1e-4, atol=1e-5)


def test_staircase_equals_naive_loop_in_fp64_on_flux(tiny_flux_dir):
    from densegrpo_fast.rollout.completions import dense_rollout, naive_completions
    m = build_models(ModelConfig(path=tiny_flux_dir, max_sequence_length=8), "cpu")
    tr = m.transformer.double()
    c = m.text.conditioning(["a red circle", "blue square", "green circle"])
    cond = c.from_tensors(t.double() for t in c.tensors())
    vel = GuidedVelocity(tr, 3.5, family=m.family)
    T = 4
    sig = m.family.sigmas(T, 3.0, m.latent_shape).double()
    z0 = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for n in (None, 1, 2):
        dr = dense_rollout(vel, cond, z0, sig, torch.full((T,), 0.9, dtype=torch.float64),
                           torch.Generator().manual_seed(3), n)
        ref = naive_completions(vel, cond, dr.trajectory.latents, sig, n)
        assert (dr.completions - ref).abs().max() < 1e-9, n
    assert vel.nfe > 0 and not vel.cfg  # FLUX: guidance is an input, one forward per sample


BASE = ["--config", "configs/tiny_flux_jpeg.yaml", "--set", "run.progress=false", "--set", "sampling.steps=4",
        "--set", "train.prompts_per_epoch=2", "--set", "run.epochs=1", "--set", "run.save_every=0"]


@pytest.mark.slow
def test_every_credit_method_trains_flux_and_the_lora_loads_in_flux_pipeline(tmp_path):
    import subprocess
    cases = {"sparse": [], "dense": ["credit.method=dense"], "tp": ["credit.method=turning_point"],
             "branch": ["credit.method=branching", "credit.branch_steps=[0,1]", "credit.branches=2"]}
    for name, sets in cases.items():
        run = str(tmp_path / name)
        args = [PY, "train.py"] + BASE + ["--run-dir", run]
        for s in sets:
            args += ["--set", s]
        r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert r.returncode == 0, (name, r.stderr[-3000:])
        with open(os.path.join(run, "metrics.jsonl")) as f:
            row = json.loads(f.readline())
        assert row["ratio_dev_first"] <= 1e-5 and row["micro_steps"] >= 1, name
        if name == "sparse":  # 8 trajectories x 4 steps, one forward each (no CFG batch)
            assert row["nfe"] == 8 * 4
        if name == "dense":   # rollout B*T + completions B*T(T-1)/2, one forward each; B*(T+1) decodes
            assert row["nfe"] == 8 * 4 + 8 * 4 * 3 // 2 and row["decodes"] == 8 * 5
    # the trained LoRA loads with FluxPipeline.load_lora_weights and changes the output
    run = str(tmp_path / "sparse")
    pipe = FluxFamily().from_pretrained(os.path.join(run, "model", "tiny_model"))
    m = build_models(ModelConfig(path=os.path.join(run, "model", "tiny_model"), max_sequence_length=8), "cpu")
    c = m.text.conditioning(["a red circle"])
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.7])
    fam = m.family
    with torch.no_grad():
        before = fam.velocity(pipe.transformer, z, t, c, 3.5)
        pipe.load_lora_weights(os.path.join(run, "lora"))
        after = fam.velocity(pipe.transformer, z, t, c, 3.5)
    assert (after - before).abs().max() > 1e-6


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
