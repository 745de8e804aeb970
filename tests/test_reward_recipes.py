"""The reward recipes (configs/recipes/rewards/: OCR, PickScore, aesthetic, a weighted mix on the SD3.5-M recipe)
load with their folders pointed at tiny models and train one epoch, logging each component."""
import glob
import json
import os
import subprocess

import pytest

from conftest import PY, ROOT

RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "recipes", "rewards", "*.yaml")))

SCRIPT = r"""
import json, os, sys, torch, yaml
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from conftest import build_tiny_clip
from densegrpo_fast.config import TinyModelConfig, load_config
from densegrpo_fast.models.sd3 import build_tiny_sd3
from densegrpo_fast.train.trainer import Trainer
root, out, recipes = sys.argv[1], sys.argv[2], sys.argv[3:]
words = ["a", "red", "blue", "circle", "square", "photo", "of"]
build_tiny_sd3(os.path.join(out, "sd3"), words, TinyModelConfig(num_layers=1), seed=0)
clip = build_tiny_clip(os.path.join(out, "clip"), words)
from safetensors.torch import save_file
head = os.path.join(out, "head.safetensors")
save_file({"layers.0.weight": torch.randn(4, 16), "layers.0.bias": torch.zeros(4),
           "layers.1.weight": torch.randn(1, 4), "layers.1.bias": torch.zeros(1)}, head)
data = os.path.join(root, "tests", "data", "flow_grpo")
for path in recipes:
    raw = yaml.safe_load(open(path))
    sets = [f"model.path={os.path.join(out, 'sd3')}", "model.resolution=32", "model.max_sequence_length=8",
            "model.dtype=float32", "model.lora.r=4", "model.lora.alpha=8", "eval.enabled=false", "run.epochs=1",
            "run.save_every=0", "run.progress=false", "train.prompts_per_epoch=1", "train.group_size=2",
            "sampling.steps=3"]
    ocr = raw["prompts"].get("format") == "ocr"
    sets.append(f"prompts.path={os.path.join(data, 'ocr_sample.txt' if ocr else 'pickscore_sample.txt')}")
    for name, comp in raw["reward"]["components"].items():
        if "path" in comp:
            sets += [f"reward.components.{name}.path={clip}", f"reward.components.{name}.dtype=float32"]
        if "head" in comp:
            sets.append(f"reward.components.{name}.head={head}")
    cfg = load_config(path, sets)
    row = Trainer(cfg, os.path.join(out, "runs", os.path.basename(path)[:-5])).run()[0]
    print("RECIPE", json.dumps({"name": os.path.basename(path)[:-5],
                                "components": sorted(k for k in row if k.startswith("reward/"))}), flush=True)
"""


@pytest.mark.slow
def test_reward_recipes_train_an_epoch(tmp_path):
    assert len(RECIPES) == 4
    r = subprocess.run([PY, "-c", SCRIPT, ROOT, str(tmp_path)] + RECIPES, cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stderr[-4000:]
    done = {d["name"]: d for d in (json.loads(x.split("RECIPE", 1)[1]) for x in r.stdout.splitlines()
                                   if x.startswith("RECIPE"))}
    assert sorted(done) == ["sd35m_aesthetic", "sd35m_mix", "sd35m_ocr", "sd35m_pickscore"]
    assert "reward/ocr_mean" in done["sd35m_ocr"]["components"]
    mix = done["sd35m_mix"]["components"]
    for c in ("pickscore", "clip_score", "aesthetic"):
        assert f"reward/{c}_mean" in mix and f"reward/{c}_weighted" in mix
