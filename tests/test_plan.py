"""`densegrpo plan`: parameter counts from config.json files alone (meta device) equal the built tiny models', the
LoRA count equals what peft adds, and the SD3.5-M / FLUX.1-dev tables come from their published configs."""
import os
import subprocess

import pytest
import torch

from densegrpo_fast.config import LoraConfig, TinyModelConfig, load_config
from densegrpo_fast.plan import count_parameters, lora_parameters, plan
from conftest import PY, ROOT


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_counts_equal_the_built_models(tmp_path, family):
    from densegrpo_fast.models import load_pipeline
    from densegrpo_fast.models.flux import build_tiny_flux
    from densegrpo_fast.models.lora import add_lora
    from densegrpo_fast.models.sd3 import SD3Family, build_tiny_sd3
    folder = str(tmp_path / family)
    (build_tiny_flux if family == "flux" else build_tiny_sd3)(folder, ["a", "red", "circle"],
                                                              TinyModelConfig(num_layers=1), seed=0)
    counts, meta_tr = count_parameters(folder, family)
    pipe = load_pipeline(folder, family, torch.float32)
    for name, n in counts.items():
        assert n == sum(p.numel() for p in getattr(pipe, name).parameters()), name
    assert set(counts) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    lc = LoraConfig(r=4)
    n_lora = lora_parameters(meta_tr, list(SD3Family.lora_targets), lc.r)
    added = add_lora(pipe.transformer, lc, SD3Family())
    assert n_lora == sum(p.numel() for p in added) > 0


@pytest.mark.slow
def test_published_configs_plan():
    cfg = load_config(os.path.join(ROOT, "configs", "recipes", "sd35m_flow_grpo.yaml"),
                      [f"model.path={ROOT}/tests/data/sd35m"])
    p = plan(cfg, world=8)
    assert round(p["params"]["transformer"] / 1e6, 1) == 2243.2  # SD3.5-Medium MMDiT-X
    assert p["tokens"] == (512 // 8 // 2) ** 2 + 256 + 77 and p["resolution"] == 512
    assert p["forwards"]["rollout"] == 48 * 24 * 10 * 2
    cfg = load_config(os.path.join(ROOT, "configs", "recipes", "flux_dev_dense_grpo.yaml"),
                      [f"model.path={ROOT}/tests/data/flux_dev"])
    p = plan(cfg, world=8)
    assert round(p["params"]["transformer"] / 1e6, 1) == 11901.4  # FLUX.1-dev
    assert p["forwards"]["completions"] == 48 * 16 * 6 * 5 // 2      # T(T-1)/2 per trajectory, no CFG batch
    cfg = load_config(os.path.join(ROOT, "configs", "recipes", "sd35l_flow_grpo.yaml"),
                      [f"model.path={ROOT}/tests/data/sd35l"])
    p = plan(cfg, world=8)
    assert round(p["params"]["transformer"] / 1e6, 1) == 8056.6 and p["blocks"] == 38  # SD3.5-Large MMDiT
    cfg = load_config(os.path.join(ROOT, "configs", "recipes", "qwen_image_flow_grpo.yaml"),
                      [f"model.path={ROOT}/tests/data/qwen_image"])
    p = plan(cfg, world=8)
    assert round(p["params"]["transformer"] / 1e9, 2) == 20.43 and p["blocks"] == 60  # Qwen-Image MMDiT
    assert p["tokens"] == (512 // 8 // 2) ** 2 + cfg.model.max_sequence_length
    assert p["forwards"]["rollout"] == cfg.train.prompts_per_epoch * cfg.train.group_size * cfg.sampling.steps * 2
    r = subprocess.run([PY, "-m", "densegrpo_fast.cli", "plan", "--config",
                        "configs/recipes/flux_dev_flow_grpo.yaml", "--set", "model.path=tests/data/flux_dev",
                        "--world", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| transformer | 11,901.4 M |" in r.stdout and "per-GPU memory" in r.stdout


@pytest.mark.parametrize("config,family", [("tiny_jpeg.yaml", "sd3"), ("tiny_flux_jpeg.yaml", "flux")])
def test_tiny_configs_plan_without_a_model_folder(tmp_path, config, family):
    """A tiny config (model.path null) is planned from the tiny model a run of it builds: the same family, spec and
    prompt vocabulary, so the counts equal the trainer's model's."""
    from densegrpo_fast.models import build_models
    from densegrpo_fast.prompts import load_prompts, vocabulary
    cfg = load_config(os.path.join(ROOT, "configs", config))
    assert cfg.model.path is None
    p = plan(cfg, world=2)
    assert p["family"] == family and p["world"] == 2 and "model.tiny" in p["folder"]
    assert p["resolution"] == cfg.model.tiny.resolution
    models = build_models(cfg.model, "cpu", words=vocabulary(load_prompts(cfg.prompts, "train")),
                          work_dir=str(tmp_path), seed=cfg.run.seed)
    assert p["params"]["transformer"] == sum(t.numel() for t in models.transformer.parameters())
    cfg_rows = 2 if family == "sd3" else 1
    assert p["forwards"]["rollout"] == (cfg.train.prompts_per_epoch * cfg.train.group_size * cfg.sampling.steps
                                        * cfg_rows)
