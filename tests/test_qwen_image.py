"""The Qwen-Image family behind the model seam: a tiny QwenImagePipeline built from configs, saved as a diffusers
folder and loaded through the same path as a real checkpoint; our sampler (true CFG with the norm rescale, packing,
timestep, schedule) equals QwenImagePipeline's own loop; decode equals its decode; the text mask is honoured."""
import glob
import json
import os
import re

import numpy as np
import pytest
import torch

from densegrpo_fast.config import TinyModelConfig
from densegrpo_fast.models.base import Cond, ModelFolderError
from densegrpo_fast.models.registry import check_model_folder, family_of_folder, get_family
from densegrpo_fast.models.qwen_image import (PROMPT_TEMPLATE, TEMPLATE_START_IDX, QwenImageFamily, pack,
                                              qwen_sigmas, unpack)
from conftest import ROOT, poison_like

WORDS = ["a", "red", "blue", "green", "circle", "square"]
PROMPTS = ["a red circle", "green square"]
L = 16          # model.max_sequence_length of the tests
W = 4.0         # true CFG scale


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, pipeline loaded back from it, family bound to it)."""
    folder = str(tmp_path_factory.mktemp("qwen") / "model")
    fam = QwenImageFamily()
    fam.build_tiny(folder, WORDS, TinyModelConfig(num_layers=1), seed=0)
    pipe = fam.from_pretrained(folder, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    fam.bind(pipe)
    return folder, pipe, fam


def _cond(fam, pipe, prompts, length=L):
    c = fam.encode(pipe, prompts, length, "cpu")
    return c.with_negative(fam.encode(pipe, [""], length, "cpu"))


def test_folder_is_a_qwen_image_pipeline(tiny):
    folder, pipe, fam = tiny
    assert type(pipe).__name__ == "QwenImagePipeline" and get_family("qwen_image").name == "qwen_image"
    assert family_of_folder(folder) == "qwen_image"
    check_model_folder(folder, "qwen_image")
    # the prompt template and its 34-token prefix are the pipeline's, and the tiny tokenizer spells the prefix as 34
    assert pipe.prompt_template_encode == PROMPT_TEMPLATE
    assert pipe.prompt_template_encode_start_idx == TEMPLATE_START_IDX
    assert len(pipe.tokenizer(PROMPT_TEMPLATE.split("{}")[0]).input_ids) == TEMPLATE_START_IDX
    for w in WORDS:  # every prompt word one token
        assert len(pipe.tokenizer(" " + w).input_ids) == 1
    names = {n for n, _ in pipe.transformer.named_modules()}
    for t in fam.lora_targets:
        assert any(n.endswith("." + t) for n in names), t
    assert fam.text_encoders(pipe) == [pipe.text_encoder]
    assert fam.latent_shape(pipe.transformer, pipe.vae, None) == (4, 16, 16)  # the built size is the native one


def test_encode_is_fixed_length_and_matches_encode_prompt(tiny):
    _, pipe, fam = tiny
    c = fam.encode(pipe, PROMPTS + [""], L, "cpu")
    assert c.names == ("embeds", "mask") and c.embeds.shape == (3, L, 32) and c.mask.shape == (3, L)
    pe, pm = pipe.encode_prompt(PROMPTS + [""], device="cpu", max_sequence_length=L)
    n = pe.shape[1]
    torch.testing.assert_close(c.embeds[:, :n], pe, rtol=0, atol=0)
    torch.testing.assert_close(c.mask[:, :n], pm, rtol=0, atol=0)
    assert (c.embeds[:, n:] == 0).all() and (c.mask[:, n:] == 0).all()
    # each row alone (the text cache encodes one prompt at a time) is the same row
    for i, p in enumerate(PROMPTS + [""]):
        one = fam.encode(pipe, [p], L, "cpu")
        torch.testing.assert_close(one.embeds[0], c.embeds[i], rtol=1e-5, atol=1e-6)
        assert torch.equal(one.mask[0], c.mask[i])
    assert c.mask.sum(1).tolist() == [8, 7, 5]  # words + "<|im_end|>\n<|im_start|>assistant\n"


def _euler(fam, transformer, z, sig, cond, guidance, grad_uncond=True):
    for k in range(sig.numel() - 1):
        s = sig[k].expand(z.shape[0])
        v = fam.velocity(transformer, z, s, cond, guidance, grad_uncond)
        z = z + v * (sig[k + 1] - sig[k])
    return z


@pytest.fixture(scope="module")
def sampled(tiny):
    """Our Euler ODE (family velocity, our sigmas) and QwenImagePipeline's loop from the same latents: (z0, ours,
    the pipeline's packed final latents, the pipeline's decoded images)."""
    _, pipe, fam = tiny
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    T = 4
    kw = dict(prompt=PROMPTS, negative_prompt=[""] * 2, true_cfg_scale=W, height=32, width=32,
              num_inference_steps=T, max_sequence_length=L, return_dict=False)
    theirs = pipe(latents=pack(z0), output_type="latent", **kw)[0]
    images = pipe(latents=pack(z0), output_type="pt", **kw)[0]
    sig = fam.sigmas(T, 3.0, (4, 16, 16), pipe.scheduler.config)
    with torch.no_grad():
        ours = _euler(fam, pipe.transformer, z0.clone(), sig, _cond(fam, pipe, PROMPTS), W)
    return z0, ours, theirs, images


def test_our_sampler_equals_the_pipeline_loop(tiny, sampled):
    """Euler through the seam (schedule with dynamic shift and shift_terminal, 2x2 packing, img_shapes, timestep =
    sigma, the fixed-length masked text, true CFG with the norm rescale over the packed channels) equals
    QwenImagePipeline.__call__ on the same latents, prompts and negative prompt."""
    _, pipe, fam = tiny
    z0, ours, theirs, _ = sampled
    assert theirs.shape == (2, 64, 16)
    assert (ours - z0).abs().max() > 0.1  # the steps moved the latents
    torch.testing.assert_close(pack(ours), theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, unpack(theirs, 16, 16), rtol=1e-5, atol=1e-5)
    # the project's own ODE sampler gives the same
    from densegrpo_fast.rollout.sampler import GuidedVelocity, ode_sample
    vel = GuidedVelocity(pipe.transformer, W, fam)
    sig = fam.sigmas(4, 3.0, (4, 16, 16), pipe.scheduler.config)
    torch.testing.assert_close(ode_sample(vel, _cond(fam, pipe, PROMPTS), z0, sig), ours, rtol=1e-6, atol=1e-6)
    assert vel.cfg and vel.nfe == 2 * 2 * 4  # 2 samples x CFG 2 x 4 steps


def test_guidance_one_is_the_conditional_forward(tiny):
    _, pipe, fam = tiny
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    s = torch.tensor([0.9, 0.3])
    c = _cond(fam, pipe, PROMPTS)
    p = c.positive()
    with torch.no_grad():
        v = fam.velocity(pipe.transformer, z, s, c, 1.0)
        ref = pipe.transformer(hidden_states=pack(z), timestep=s, encoder_hidden_states=p.embeds,
                               encoder_hidden_states_mask=p.mask, img_shapes=[[(1, 8, 8)]] * 2,
                               return_dict=False)[0]
    torch.testing.assert_close(v, unpack(ref, 16, 16), rtol=0, atol=0)
    assert fam.nfe_per_sample(1.0) == 1 and fam.nfe_per_sample(W) == 2


def test_true_cfg_rescale_and_grad_uncond_layouts_agree(tiny):
    _, pipe, fam = tiny
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    s = torch.tensor([0.8, 0.5])
    c = _cond(fam, pipe, PROMPTS)
    with torch.no_grad():
        both = fam.velocity(pipe.transformer, z, s, c, W, grad_uncond=True)
        cond_only = fam.velocity(pipe.transformer, z, s, c, W, grad_uncond=False)
        vc = pack(fam.velocity(pipe.transformer, z, s, c.positive(), 1.0))
        vu = pack(fam.velocity(pipe.transformer, z, s, c.negative(), 1.0))
    torch.testing.assert_close(cond_only, both, rtol=1e-6, atol=1e-6)
    comb = vu + W * (vc - vu)
    ref = comb * (vc.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(pack(both), ref, rtol=1e-5, atol=1e-6)
    # per token, the guided velocity has the conditional's norm over the packed channels
    torch.testing.assert_close(pack(both).norm(dim=-1), vc.norm(dim=-1), rtol=1e-5, atol=1e-6)
    # with autograd: both layouts give the same value and a gradient through the conditional rows
    zg = z.clone().requires_grad_(True)
    v1 = fam.velocity(pipe.transformer, zg, s, c, W, grad_uncond=False)
    torch.testing.assert_close(v1.detach(), both, rtol=1e-6, atol=1e-6)
    v1.square().sum().backward()
    assert torch.isfinite(zg.grad).all() and zg.grad.abs().sum() > 0


def test_decode_equals_the_pipeline_decode(tiny, sampled):
    """latents * std + mean per channel (as latents / (1/std) + mean), the VAE's frame axis, [-1, 1] -> [0, 1]: our
    decode of the pipeline's final latents equals its output_type='pt' images."""
    _, pipe, fam = tiny
    _, _, theirs, images = sampled
    assert images.shape == (2, 3, 32, 32)
    out = poison_like(images)
    with torch.no_grad():
        out[:] = fam.decode(pipe.vae, unpack(theirs, 16, 16))
    torch.testing.assert_close(out, images, rtol=0, atol=1e-6)
    assert len(set(pipe.vae.config.latents_std)) > 1  # the per-channel statistics are not trivial


def test_sigmas_equal_the_scheduler_and_latent_shape_errors(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
    _, pipe, fam = tiny
    cfg = pipe.scheduler.config
    assert cfg.use_dynamic_shifting and cfg.shift_terminal == 0.02 and cfg.max_image_seq_len == 8192
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    for T, res in [(4, 32), (10, 512), (50, 1024), (28, 1328)]:
        shape = fam.latent_shape(pipe.transformer, pipe.vae, res) if res <= 64 else (16, res // 8, res // 8)
        seq = (shape[1] // 2) * (shape[2] // 2)
        mu = calculate_shift(seq, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / T, T), mu=mu)
        ours = fam.sigmas(T, 3.0, shape, cfg)
        assert ours.dtype == torch.float32 and ours.shape == (T + 1,) and ours[-1] == 0
        torch.testing.assert_close(ours, sched.sigmas, rtol=0, atol=5e-7)
        assert abs(ours[-2].item() - 0.02) < 1e-6  # stretched to shift_terminal
    torch.testing.assert_close(qwen_sigmas(4, 64, cfg), fam.sigmas(4, 1.0, (4, 16, 16), cfg), rtol=0, atol=0)
    assert fam.latent_shape(pipe.transformer, pipe.vae, 64) == (4, 32, 32)
    for bad in (30, 33):
        with pytest.raises(ValueError, match=rf"model.resolution={bad}: must be a multiple of .* 2 x 2 = 4"):
            fam.latent_shape(pipe.transformer, pipe.vae, bad)


def test_mask_is_honoured(tiny):
    """Padding a prompt to a longer L (mask 0), or filling the padded embeddings with anything, leaves the velocity
    unchanged; an all-ones mask over the same padding does change it (the test can fail)."""
    _, pipe, fam = tiny
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    s = torch.tensor([0.7, 0.2])
    short, long = _cond(fam, pipe, PROMPTS, 8), _cond(fam, pipe, PROMPTS, 40)
    assert short.mask.shape == (2, 8) and long.mask.shape == (2, 40)
    g = torch.Generator().manual_seed(7)
    junk = {n: (t + 10 * torch.randn(t.shape, generator=g) * (1 - m).unsqueeze(-1) if n.endswith("embeds") else t)
            for n, t, m in zip(long.names, long.tensors(), [long.mask, long.mask, long.neg_mask, long.neg_mask])}
    junk = Cond(**junk)
    with torch.no_grad():
        for guidance in (1.0, W):
            v8 = fam.velocity(pipe.transformer, z, s, short, guidance)
            v40 = fam.velocity(pipe.transformer, z, s, long, guidance)
            vj = fam.velocity(pipe.transformer, z, s, junk, guidance)
            torch.testing.assert_close(v40, v8, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(vj, v8, rtol=1e-5, atol=1e-5)
        unmasked = Cond(**{n: (torch.ones_like(t) if n.endswith("mask") else t)
                           for n, t in zip(junk.names, junk.tensors())})
        vu = fam.velocity(pipe.transformer, z, s, unmasked, W)
    assert (vu - v8).abs().max() > 1e-3


def test_another_familys_folder_is_a_model_folder_error(tiny, tmp_path):
    folder, _, fam = tiny
    try:
        from densegrpo_fast.models.sd3 import build_tiny_sd3
    except ImportError:
        pytest.skip("densegrpo_fast.models.sd3.build_tiny_sd3 not available")
    sd3 = str(tmp_path / "sd3")
    build_tiny_sd3(sd3, WORDS, TinyModelConfig(num_layers=1), seed=0)
    with pytest.raises(ModelFolderError, match=rf"'{re.escape(sd3)}'.*QwenImagePipeline.*StableDiffusion3Pipeline"):
        fam.from_pretrained(sd3, torch.float32)
    with pytest.raises(ModelFolderError, match=rf"holds a QwenImagePipeline .*model.family is 'sd3'"):
        check_model_folder(folder, "sd3")
    missing = str(tmp_path / "nothing")
    with pytest.raises(ModelFolderError, match=rf"'{re.escape(missing)}'.*QwenImagePipeline"):
        fam.from_pretrained(missing, torch.float32)


def test_plan_geometry_on_the_published_config():
    with open(os.path.join(ROOT, "tests", "data", "qwen_image", "transformer", "config.json")) as f:
        tcfg = json.load(f)
    vcfg = {"_class_name": "AutoencoderKLQwenImage", "temperal_downsample": [False, True, True], "z_dim": 16}
    fam = QwenImageFamily()
    assert fam.plan_geometry(tcfg, vcfg, None, 256, W) == {
        "resolution": 1024, "latent": 128, "image_tokens": 4096, "text_tokens": 256, "cfg_rows": 2}
    assert fam.plan_geometry(tcfg, {}, 512, 128, 1.0) == {
        "resolution": 512, "latent": 64, "image_tokens": 1024, "text_tokens": 128, "cfg_rows": 1}
    import diffusers
    with torch.device("meta"):
        tr = diffusers.QwenImageTransformer2DModel.from_config(
            {k: v for k, v in tcfg.items() if k != "pooled_projection_dim"})
    assert 20.4e9 < sum(p.numel() for p in tr.parameters()) < 20.5e9  # Qwen-Image's 20B MMDiT
    with open(os.path.join(ROOT, "tests", "data", "sd35l", "transformer", "config.json")) as f:
        scfg = json.load(f)
    with torch.device("meta"):
        sd = diffusers.SD3Transformer2DModel.from_config(scfg)
    assert 8.0e9 < sum(p.numel() for p in sd.parameters()) < 8.1e9  # SD3.5-Large's 8.1B MMDiT


def test_recipes_load_on_a_qwen_image_folder(tiny):
    from densegrpo_fast.config import load_config
    folder = tiny[0]
    recipes = sorted(glob.glob(os.path.join(ROOT, "configs", "recipes", "qwen_image_*.yaml")))
    assert len(recipes) == 4
    methods = set()
    for path in recipes:
        cfg = load_config(path, [f"model.path={folder}"])
        assert cfg.model.family == "qwen_image" and cfg.sampling.guidance > 1
        methods.add(cfg.credit.method)
    assert methods == {"sparse", "dense", "turning_point", "branching"}


def test_lora_on_the_family_targets_loads_in_qwen_image_pipeline(tiny, tmp_path):
    """LoRA on lora_targets, saved in diffusers format, loads with QwenImagePipeline.load_lora_weights and gives the
    adapted network's velocity."""
    from densegrpo_fast.config import LoraConfig
    from densegrpo_fast.models.lora import add_lora, lora_metadata, lora_state_dict, save_lora
    folder, _, fam = tiny
    pipe = fam.from_pretrained(folder, torch.float32)
    params = add_lora(pipe.transformer, LoraConfig(r=4, alpha=8), fam, seed=0)
    assert len(params) == 2 * len(fam.lora_targets)  # A and B of every target in the one block
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    s = torch.tensor([0.6])
    c = _cond(fam, pipe, PROMPTS[:1])
    with torch.no_grad():
        adapted = fam.velocity(pipe.transformer, z, s, c, W)
    save_lora(str(tmp_path / "lora"), lora_state_dict(pipe.transformer), lora_metadata(pipe.transformer),
              "qwen_image")
    fresh = fam.from_pretrained(folder, torch.float32)
    with torch.no_grad():
        base = fam.velocity(fresh.transformer, z, s, c, W)
        fresh.load_lora_weights(str(tmp_path / "lora"))
        loaded = fam.velocity(fresh.transformer, z, s, c, W)
    assert (adapted - base).abs().max() > 1e-4
    torch.testing.assert_close(loaded, adapted, rtol=1e-5, atol=1e-6)
