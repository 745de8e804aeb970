import json
import os
import shutil

import pytest
import torch

from densegrpo_fast.config import LoraConfig, ModelConfig
from densegrpo_fast.models.sd3 import (ModelFolderError, PromptEncoder, add_lora, adapter_disabled, load_sd3,
                                       lora_metadata, lora_state_dict, save_lora)


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
    enc = PromptEncoder(pipe, 4, torch.device("cpu"), torch.float32)
    e1, p1 = enc.encode(["a red circle", "a blue square", "a red circle"])
    assert e1.shape[0] == 3 and torch.equal(e1[0], e1[2]) and not torch.equal(e1[0], e1[1])
    calls = []
    orig = enc._encode_uncached
    enc._encode_uncached = lambda ps: calls.append(ps) or orig(ps)
    e2, _ = enc.encode(["a blue square", "a red circle"])
    assert calls == []  # cached: the text encoders did not run
    torch.testing.assert_close(e2[1], e1[0])


def test_lora_targets_reference_policy_and_diffusers_roundtrip(tmp_path, tiny_model_dir):
    pipe = load_sd3(tiny_model_dir)
    tr = pipe.transformer
    params = add_lora(tr, LoraConfig(r=4, alpha=8))
    assert params and all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in tr.parameters()) == len(params)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 4, 16, 16)
    e, pooled = PromptEncoder(pipe, 4, torch.device("cpu"), torch.float32).encode(["a red circle"] * 2)
    kw = dict(hidden_states=x, encoder_hidden_states=e, pooled_projections=pooled, timestep=torch.full((2,), 500.0))
    with torch.no_grad():
        v_lora = tr(**kw).sample
        with adapter_disabled(tr):
            v_ref = tr(**kw).sample
        assert not torch.allclose(v_lora, v_ref)
        save_lora(str(tmp_path / "lora"), lora_state_dict(tr), lora_metadata(tr))
        fresh = load_sd3(tiny_model_dir)
        v_base = fresh.transformer(**kw).sample
        torch.testing.assert_close(v_base, v_ref)  # adapter disabled == the base network
        fresh.load_lora_weights(str(tmp_path / "lora"))
        torch.testing.assert_close(fresh.transformer(**kw).sample, v_lora, rtol=1e-5, atol=1e-5)


def test_bad_lora_targets(tiny_model_dir):
    pipe = load_sd3(tiny_model_dir)
    with pytest.raises(ValueError, match="model.lora.targets"):
        add_lora(pipe.transformer, LoraConfig(targets=["nonexistent_proj"]))
