import shutil

import pytest
import torch

from densegrpo_fast.config import LoraConfig, ModelConfig
from densegrpo_fast.models import build_models, load_pipeline
from densegrpo_fast.models.base import ModelFolderError, PromptEncoder
from densegrpo_fast.models.lora import add_lora, adapter_disabled, lora_metadata, lora_state_dict, save_lora
from conftest import sd3


def load_sd3(path):
    return load_pipeline(path, "sd3", torch.float32)


def test_missing_and_malformed_folders(tmp_path, tiny_model_dir):
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_sd3(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelFolderError, match="missing vae"):
        load_sd3(str(broken))
    (broken / "vae").mkdir()
    with pytest.raises(ModelFolderError, match="could not be loaded"):
        load_sd3(str(broken))
    bad_index = tmp_path / "badindex"
    shutil.copytree(tiny_model_dir, bad_index)
    (bad_index / "model_index.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        load_sd3(str(bad_index))


def test_sd3_code_path_and_text_cache(tiny_model_dir):
    pipe = load_sd3(tiny_model_dir)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    enc = PromptEncoder(pipe, 4, torch.device("cpu"), torch.float32, sd3())
    e1 = enc.encode(["a red circle", "a blue square", "a red circle"]).embeds
    assert e1.shape[0] == 3 and torch.equal(e1[0], e1[2]) and not torch.equal(e1[0], e1[1])
    calls = []
    orig = enc.encode_with_grad
    enc.encode_with_grad = lambda ps: calls.append(ps) or orig(ps)
    e2 = enc.encode(["a blue square", "a red circle"]).embeds
    assert calls == []  # cached: the text encoders did not run
    torch.testing.assert_close(e2[1], e1[0])


def test_lora_targets_reference_policy_and_diffusers_roundtrip(tmp_path, tiny_model_dir):
    pipe = load_sd3(tiny_model_dir)
    tr = pipe.transformer
    params = add_lora(tr, LoraConfig(r=4, alpha=8), sd3())
    assert params and all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in tr.parameters()) == len(params)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 4, 16, 16)
    c = PromptEncoder(pipe, 4, torch.device("cpu"), torch.float32, sd3()).encode(["a red circle"] * 2)
    e, pooled = c.embeds, c.pooled
    kw = dict(hidden_states=x, encoder_hidden_states=e, pooled_projections=pooled, timestep=torch.full((2,), 500.0))
    with torch.no_grad():
        v_lora = tr(**kw).sample
        with adapter_disabled(tr):
            v_ref = tr(**kw).sample
        assert not torch.allclose(v_lora, v_ref)
        save_lora(str(tmp_path / "lora"), lora_state_dict(tr), lora_metadata(tr), "sd3")
        fresh = load_sd3(tiny_model_dir)
        v_base = fresh.transformer(**kw).sample
        torch.testing.assert_close(v_base, v_ref)  # adapter disabled == the base network
        fresh.load_lora_weights(str(tmp_path / "lora"))
        torch.testing.assert_close(fresh.transformer(**kw).sample, v_lora, rtol=1e-5, atol=1e-5)


def test_bad_lora_targets(tiny_model_dir):
    pipe = load_sd3(tiny_model_dir)
    with pytest.raises(ValueError, match="model.lora.targets"):
        add_lora(pipe.transformer, LoraConfig(targets=["nonexistent_proj"]), sd3())


@pytest.mark.parametrize("resolution", [32, 64])
def test_resolution_sets_latents_images_and_eval_size(tiny_model_dir, resolution):
    """model.resolution on one tiny folder (built at 32 px, VAE factor 2, patch 2): the latents, the decoded images
    and the evaluation sampler all use resolution / 2 latents and resolution-pixel images."""
    from densegrpo_fast.eval import generate
    from densegrpo_fast.rollout.schedule import flow_sigmas
    cfg = ModelConfig(path=tiny_model_dir, resolution=resolution, max_sequence_length=4)
    m = build_models(cfg, "cpu")
    assert m.latent_shape == (4, resolution // 2, resolution // 2) and m.resolution == resolution
    imgs = m.decode(torch.randn(3, *m.latent_shape))
    assert imgs.shape == (3, 3, resolution, resolution)
    out = generate(m.transformer, m.text, m.decode, m.latent_shape, ["a red circle"], [(0, 0), (0, 1)],
                   flow_sigmas(3, 3.0), 4.5, 0, "cpu", m.family)
    assert out.shape == (2, 3, resolution, resolution) and torch.isfinite(out).all()


def test_resolution_errors_name_the_setting(tiny_model_dir):
    with pytest.raises(ValueError, match=r"model.resolution=34: must be a multiple of VAE factor x patch size = 2 x 2"):
        build_models(ModelConfig(path=tiny_model_dir, resolution=34), "cpu")
    with pytest.raises(ValueError, match=r"model.resolution=128: 32 patches per side exceed .*pos_embed_max_size=16"):
        build_models(ModelConfig(path=tiny_model_dir, resolution=128), "cpu")


def test_prompt_cache_is_bounded_and_exact(tiny_model_dir):
    """400 prompts through a cache of 64: the cache never holds more than 64 prompts (host tensors), device
    tensors are per batch, and an evicted prompt re-encodes to the same embedding."""
    pipe = load_sd3(tiny_model_dir)
    enc = PromptEncoder(pipe, 4, torch.device("cpu"), torch.float32, sd3(), cache_size=64)
    words = ["red", "blue", "green", "circle", "square", "a"]
    prompts = [f"{words[i % 6]} {words[(i // 6) % 6]} {words[(i // 36) % 6]} {i}" for i in range(400)]
    first_e, first_p = enc.encode(prompts[:16]).tensors()
    sizes = []
    for s in range(0, 400, 16):
        e, p = enc.encode(prompts[s:s + 16]).tensors()
        assert e.shape[0] == p.shape[0] == len(prompts[s:s + 16])
        sizes.append(len(enc))
    assert max(sizes) == 64
    n_tensors = sum(len(v.tensors()) for v in enc._cache.values())
    assert n_tensors == 2 * 64  # (embeds, pooled) per cached prompt
    assert all(t.device.type == "cpu" for v in enc._cache.values() for t in v.tensors())
    again_e, again_p = enc.encode(prompts[:16]).tensors()  # evicted long ago: encoded anew, identical
    torch.testing.assert_close(again_e, first_e, rtol=0, atol=0)
    torch.testing.assert_close(again_p, first_p, rtol=0, atol=0)
    # a batch larger than the cache is still returned whole and correct
    e, _ = enc.encode(prompts[:100]).tensors()
    assert e.shape[0] == 100 and len(enc) == 64
    torch.testing.assert_close(e[:16], first_e, rtol=0, atol=0)


def test_trainer_evaluation_uses_the_configured_schedule_and_text_length(tiny_model_dir, tmp_path):
    """evaluate_prompts samples with the context's eval schedule (sampling.eval_steps, sampling.shift) and its text
    encoder (model.max_sequence_length): seen by the transformer's timesteps and text length."""
    from densegrpo_fast.config import Config
    from densegrpo_fast.eval import EvalContext, evaluate_prompts
    from densegrpo_fast.rewards import CombinedReward
    from densegrpo_fast.rollout.schedule import NoiseSchedule, flow_sigmas
    cfg = Config()
    cfg.eval.samples_per_prompt, cfg.eval.grid, cfg.sampling.eval_steps, cfg.sampling.shift = 1, False, 3, 1.7
    cfg.model.max_sequence_length = 6
    m = build_models(ModelConfig(path=tiny_model_dir, max_sequence_length=6), "cpu")
    seen = []
    h = m.transformer.register_forward_pre_hook(
        lambda mod, args, kw: seen.append((kw["timestep"].clone(), kw["encoder_hidden_states"].shape[1])),
        with_kwargs=True)
    ctx = EvalContext(cfg=cfg, transformer=m.transformer, models=m,
                      sigmas=NoiseSchedule(flow_sigmas(3, 1.7), 0.0, "cpu").sigmas,
                      reward=CombinedReward({"jpeg_compressibility": 1.0}), rank=0, world=1,
                      device=torch.device("cpu"), run_dir=str(tmp_path), main=True, progress=False)
    out = evaluate_prompts(ctx, ["a red circle", "a blue square"], 0)
    h.remove()
    assert "eval_reward_mean" in out and len(seen) == 3
    import json
    rec = json.load(open(tmp_path / "evals" / "epoch0.json"))   # per-image record for paired comparisons
    assert rec["pairs"] == [[0, 0], [1, 0]] and len(rec["reward"]) == 2
    expect = flow_sigmas(3, 1.7)[:-1] * 1000.0
    for k, (t, seq) in enumerate(seen):
        torch.testing.assert_close(t, expect[k].expand_as(t))
        assert seq == 16 + 6  # CLIP tokens (tiny tokenizer: 16) + model.max_sequence_length T5 slots


def test_decode_is_chunked_and_equal_to_one_call(tiny_model_dir):
    """model.decode_batch bounds the VAE batch: 7 latents with decode_batch 3 -> calls of 3, 3, 1, same images."""
    m = build_models(ModelConfig(path=tiny_model_dir, decode_batch=3), "cpu")
    sizes = []
    h = m.vae.decoder.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    z = torch.randn(7, *m.latent_shape, generator=torch.Generator().manual_seed(0))
    chunked = m.decode(z)
    h.remove()
    assert sizes == [3, 3, 1]
    m.decode_batch = 64
    torch.testing.assert_close(chunked, m.decode(z), rtol=1e-5, atol=1e-6)


def test_fallback_warns_once_with_the_reason(monkeypatch):
    """A C++ extension that does not import: `auto` falls back to torch with ONE warning naming the import error."""
    import importlib
    import warnings
    from densegrpo_fast import ops
    real = importlib.import_module

    def broken(name, *a, **k):
        if name == "densegrpo_fast._C":
            raise ImportError("undefined symbol: _ZN3c10 (built against another torch)")
        return real(name, *a, **k)

    monkeypatch.setattr(ops, "_MODULES", {})
    monkeypatch.setattr(ops, "_WARNED", set())
    monkeypatch.setattr(ops.importlib, "import_module", broken)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert ops.resolve_backend(torch.device("cpu"), "auto") == "torch"
        assert ops.resolve_backend(torch.device("cpu"), "auto") == "torch"
    msgs = [str(x.message) for x in w if "cpp ops unavailable" in str(x.message)]
    assert len(msgs) == 1 and "undefined symbol" in msgs[0]
    with pytest.raises(RuntimeError, match="ops.backend='cpp' was forced but that backend is not built"):
        ops.resolve_backend(torch.device("cpu"), "cpp")
    monkeypatch.setattr(ops, "_MODULES", {})  # the real module again for later tests


@pytest.fixture(scope="module")
def tiny_flux_folder(tmp_path_factory):
    from densegrpo_fast.config import TinyModelConfig
    from densegrpo_fast.models.flux import build_tiny_flux
    folder = str(tmp_path_factory.mktemp("flux_enc") / "model")
    build_tiny_flux(folder, ["a", "red", "blue", "green", "circle", "square"], TinyModelConfig(num_layers=1), seed=0)
    return folder


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_prompts_embedding_does_not_depend_on_what_shares_its_batch(tiny_model_dir, tiny_flux_folder, family,
                                                                      threads):
    """A prompt's cached embedding is bitwise the one it gets encoded alone, whether it was new together with other
    prompts, came back after an eviction, or came in another order: a resumed run, another rank count or another
    cache size sees the same numbers. Batched text-encoder GEMMs pick kernels by row count on some CPUs
    (AVX-512/AMX), which is what this guards against; 1 and 2 threads pick different kernels again."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        path = tiny_model_dir if family == "sd3" else tiny_flux_folder
        m = build_models(ModelConfig(path=path, family=family, max_sequence_length=4 if family == "sd3" else 8),
                         "cpu")
        prompts = ["a red circle", "a blue square", "green green circle", "a square", "red blue green"]
        alone = {}
        for p in prompts:
            fresh = PromptEncoder(m.pipe, m.text.max_sequence_length, torch.device("cpu"), torch.float32, m.family)
            alone[p] = fresh.encode([p])
        enc = PromptEncoder(m.pipe, m.text.max_sequence_length, torch.device("cpu"), torch.float32, m.family,
                            cache_size=2)
        batches = [prompts, prompts[::-1], [prompts[0], prompts[3], prompts[0]]]  # all new; evicted; repeated
        for batch in batches:
            c = enc.encode(batch)
            for i, p in enumerate(batch):
                for name in c.names:
                    got, want = getattr(c, name)[i], getattr(alone[p], name)[0]
                    assert torch.equal(got, want), (p, name, float((got - want).abs().max()))
            assert len(enc) <= 2
    finally:
        torch.set_num_threads(before)
