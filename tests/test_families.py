"""The family contract: one module, parametrised over every registered family (models/base.py's registry).

For each family, on a tiny model built from configs and loaded back from its folder as a real checkpoint would be:
our sampler equals the family's own diffusers pipeline loop on the same latents; the staircase equals the naive
completion loop in fp64; the LoRA export loads with the pipeline's `load_lora_weights` and changes the output; every
credit method trains an epoch through the CLI; a folder of another family is an error naming folder and pipeline
class. Adding a family adds a row to PIPELINE_LOOPS and a tiny config to TINY_CONFIGS, nothing else.
"""
import json
import os
import subprocess

import pytest
import torch

from densegrpo_fast.config import LoraConfig, ModelConfig, TinyModelConfig
from densegrpo_fast.models import build_models, load_pipeline
from densegrpo_fast.models.base import ModelFolderError
from densegrpo_fast.models.registry import family_names, get_family
from densegrpo_fast.rollout.sampler import GuidedVelocity, ode_sample
from conftest import PY, ROOT

WORDS = ["a", "red", "blue", "green", "circle", "square"]
FAMILIES = family_names()
# the tiny config each family trains through the CLI (model.path null: built from model.tiny)
TINY_CONFIGS = {"sd3": "tiny_jpeg.yaml", "flux": "tiny_flux_jpeg.yaml", "qwen_image": "tiny_qwen_image_jpeg.yaml"}
MAX_SEQ = {"sd3": 4, "flux": 8, "qwen_image": 16}


def _sd3_loop(m, prompts, z0, T, w):
    c = m.text.conditioning(prompts)
    return m.pipe(prompt_embeds=c.embeds, pooled_prompt_embeds=c.pooled, negative_prompt_embeds=c.neg_embeds,
                  negative_pooled_prompt_embeds=c.neg_pooled, latents=z0, num_inference_steps=T, guidance_scale=w,
                  output_type="latent", return_dict=False)[0]


def _flux_loop(m, prompts, z0, T, w):
    from densegrpo_fast.models.base import pack, unpack
    c = m.text.encode(prompts)
    h, wd = z0.shape[-2:]
    out = m.pipe(prompt_embeds=c.embeds, pooled_prompt_embeds=c.pooled, latents=pack(z0), num_inference_steps=T,
                 guidance_scale=w, height=m.resolution, width=m.resolution, output_type="latent",
                 return_dict=False)[0]
    return unpack(out, h, wd)


def _qwen_loop(m, prompts, z0, T, w):
    from densegrpo_fast.models.base import pack, unpack  # 2x2 patches as tokens, as FLUX
    c = m.text.conditioning(prompts)
    h, wd = z0.shape[-2:]
    out = m.pipe(prompt_embeds=c.embeds, prompt_embeds_mask=c.mask, negative_prompt_embeds=c.neg_embeds,
                 negative_prompt_embeds_mask=c.neg_mask, true_cfg_scale=w, latents=pack(z0),
                 num_inference_steps=T, height=m.resolution, width=m.resolution, output_type="latent",
                 return_dict=False)[0]
    return unpack(out, h, wd)


# the family's own diffusers denoising loop from the same initial latents: (models, prompts, z0 (B,C,h,w), steps,
# guidance) -> final latents (B,C,h,w)
PIPELINE_LOOPS = {"sd3": _sd3_loop, "flux": _flux_loop, "qwen_image": _qwen_loop}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One tiny folder per registered family, written by the family's build_tiny."""
    out = {}
    for name in FAMILIES:
        folder = str(tmp_path_factory.mktemp(name) / "model")
        get_family(name).build_tiny(folder, WORDS, TinyModelConfig(num_layers=1), seed=0)
        out[name] = folder
    return out


def _models(folders, name, dtype="float32"):
    return build_models(ModelConfig(path=folders[name], family=name, max_sequence_length=MAX_SEQ[name],
                                    dtype=dtype), "cpu")


def test_every_family_has_its_contract_rows():
    assert set(FAMILIES) == set(PIPELINE_LOOPS) == set(TINY_CONFIGS), "a registered family needs a pipeline loop " \
                                                                      "and a tiny config here"
    for name in FAMILIES:
        assert os.path.isfile(os.path.join(ROOT, "configs", TINY_CONFIGS[name])), TINY_CONFIGS[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_our_sampler_equals_the_pipeline_loop(folders, name):
    m = _models(folders, name)
    m.pipe.set_progress_bar_config(disable=True)
    prompts, T, w = ["a red circle", "green square"], 4, 3.5
    z0 = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = PIPELINE_LOOPS[name](m, prompts, z0.clone(), T, w)
        ours = ode_sample(GuidedVelocity(m.transformer, w, m.family), m.text.conditioning(prompts), z0,
                          m.sigmas(T, 3.0))
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_staircase_equals_the_naive_loop_in_fp64(folders, name):
    from densegrpo_fast.rollout.completions import dense_rollout, naive_completions
    m = _models(folders, name)
    m.transformer.double()
    c = m.text.conditioning(["a red circle", "blue square", "green circle"])
    cond = c.from_tensors(t.double() if t.is_floating_point() else t for t in c.tensors())
    vel = GuidedVelocity(m.transformer, 3.5, m.family)
    T = 4
    sig = m.sigmas(T, 3.0).double()
    z0 = torch.randn(3, *m.latent_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for n in (None, 1, 2):
        dr = dense_rollout(vel, cond, z0, sig, torch.full((T,), 0.9, dtype=torch.float64),
                           torch.Generator().manual_seed(3), n)
        ref = naive_completions(vel, cond, dr.trajectory.latents, sig, n)
        assert (dr.completions - ref).abs().max() < 1e-9, n


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_export_loads_with_the_pipeline_and_changes_the_output(folders, name, tmp_path):
    from densegrpo_fast.models.lora import add_lora, lora_metadata, lora_state_dict, save_lora
    m = _models(folders, name)
    params = add_lora(m.transformer, LoraConfig(r=4, alpha=8), m.family, seed=0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    cond = m.text.conditioning(["a red circle"])
    z = torch.randn(1, *m.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        v_lora = m.family.velocity(m.transformer, z, sigma, cond, 3.5)
    save_lora(str(tmp_path / "lora"), lora_state_dict(m.transformer), lora_metadata(m.transformer), name)
    fresh = load_pipeline(folders[name], name, torch.float32)
    fam = get_family(name)
    fam.bind(fresh)
    with torch.no_grad():
        v_base = fam.velocity(fresh.transformer, z, sigma, cond, 3.5)
        getattr(fresh, "load_lora_weights")(str(tmp_path / "lora"))
        v_loaded = fam.velocity(fresh.transformer, z, sigma, cond, 3.5)
    assert (v_loaded - v_base).abs().max() > 1e-6
    torch.testing.assert_close(v_loaded, v_lora, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_folder_of_another_family_is_an_error_naming_folder_and_pipeline(folders, name):
    for other in FAMILIES:
        if other == name:
            continue
        with pytest.raises(ModelFolderError) as e:
            build_models(ModelConfig(path=folders[other], family=name), "cpu")
        msg = str(e.value)
        assert folders[other] in msg and get_family(other).pipeline_class in msg, msg
        assert get_family(name).pipeline_class in msg, msg


@pytest.mark.parametrize("name", FAMILIES)
def test_latent_shape_errors_name_model_resolution(folders, name):
    with pytest.raises(ValueError, match=r"model.resolution=34"):
        build_models(ModelConfig(path=folders[name], family=name, resolution=34), "cpu")


def test_unregistered_family_is_a_config_error():
    from densegrpo_fast.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"model.family: 'wan' is not a registered family; choose one of auto, "):
        load_config(None, ["model.family=wan"])


METHODS = {"sparse": [], "dense": ["credit.method=dense"], "turning_point": ["credit.method=turning_point"],
           "branching": ["credit.method=branching", "credit.branch_steps=[0,1]", "credit.branches=2"],
           "window": ["credit.window=2"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_credit_method_trains_an_epoch_through_the_cli(tmp_path, name):
    base = ["--config", os.path.join("configs", TINY_CONFIGS[name]), "--set", "run.progress=false", "--set",
            "sampling.steps=4", "--set", "train.prompts_per_epoch=2", "--set", "run.epochs=1", "--set",
            "run.save_every=0"]
    import yaml
    guidance = yaml.safe_load(open(os.path.join(ROOT, "configs", TINY_CONFIGS[name])))["sampling"]["guidance"]
    for method, sets in METHODS.items():
        run = str(tmp_path / method)
        args = [PY, "train.py"] + base + ["--run-dir", run] + [x for s in sets for x in ("--set", s)]
        r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert r.returncode == 0, (name, method, r.stderr[-3000:])
        with open(os.path.join(run, "metrics.jsonl")) as f:
            row = json.loads(f.readline())
        assert row["micro_steps"] >= 1 and row["ratio_dev_first"] <= 1e-5, (name, method)
        per = get_family(name).nfe_per_sample(guidance)  # CFG families: 2 forwards per sample
        if method == "sparse":   # 8 trajectories x 4 steps
            assert row["nfe"] == 8 * 4 * per, (name, row["nfe"])
        if method == "dense":    # + completions 8 x T(T-1)/2, and 8 (T+1) decodes
            assert row["nfe"] == (8 * 4 + 8 * 4 * 3 // 2) * per and row["decodes"] == 8 * 5, (name, row["nfe"])
        assert os.path.isfile(os.path.join(run, "lora", "pytorch_lora_weights.safetensors")), (name, method)
