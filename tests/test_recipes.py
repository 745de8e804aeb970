"""The reference recipes in configs/recipes/: each loads (model.path pointed at a tiny folder of the matching family)
and trains one epoch with its own method, schedule and loss settings; only the sizes are cut for the CPU."""
import glob
import json
import os
import subprocess

import pytest

from conftest import PY, ROOT

RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "recipes", "*.yaml")))

SCRIPT = r"""
import json, os, sys, yaml
from densegrpo_fast.config import TinyModelConfig, load_config
from densegrpo_fast.models.registry import family_names, get_family
from densegrpo_fast.train.trainer import Trainer
out, recipes = sys.argv[1], sys.argv[2:]
words = ["a", "red", "blue", "circle", "square"]
tiny = {f: os.path.join(out, f) for f in family_names()}
for f, folder in tiny.items():
    get_family(f).build_tiny(folder, words, TinyModelConfig(num_layers=1), seed=0)
for path in recipes:
    raw = yaml.safe_load(open(path))
    fam = raw["model"]["family"]
    credit = raw["credit"]
    group = credit.get("branches", 2)
    cfg = load_config(path, [f"model.path={tiny[fam]}", "model.resolution=32", "model.max_sequence_length=8",
                             "model.dtype=float32", "model.lora.r=4", "model.lora.alpha=8",
                             "prompts.source=list", "eval.enabled=false", "run.epochs=1", "run.save_every=0",
                             "run.progress=false", "train.prompts_per_epoch=1", f"train.group_size={group}"])
    name = os.path.basename(path)[:-5]
    rows = Trainer(cfg, os.path.join(out, "runs", name)).run()
    print("RECIPE", json.dumps({"name": name, "family": fam, "method": cfg.credit.method, "steps": cfg.sampling.steps,
                                "noise_level": cfg.sampling.noise_level, "guidance": cfg.sampling.guidance,
                                "loss": rows[0]["loss"], "nfe": rows[0]["nfe"], "micro_steps": rows[0]["micro_steps"]}),
          flush=True)
"""


@pytest.mark.slow
def test_every_recipe_trains_an_epoch_on_its_family(tmp_path):
    import yaml
    from densegrpo_fast.models.registry import family_names
    fams = {p: yaml.safe_load(open(p))["model"]["family"] for p in RECIPES}
    assert set(fams.values()) == set(family_names())  # every family has recipes
    r = subprocess.run([PY, "-c", SCRIPT, str(tmp_path)] + RECIPES, cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stderr[-4000:]
    done = {d["name"]: d for d in (json.loads(x.split("RECIPE", 1)[1]) for x in r.stdout.splitlines()
                                   if x.startswith("RECIPE"))}
    assert sorted(done) == sorted(os.path.basename(p)[:-5] for p in RECIPES)
    for name, d in done.items():
        fam = fams[os.path.join(ROOT, "configs", "recipes", name + ".yaml")]
        assert d["family"] == fam and d["micro_steps"] >= 1, d
        raw = yaml.safe_load(open(os.path.join(ROOT, "configs", "recipes", name + ".yaml")))["sampling"]
        # what trained is what the recipe file says (the CPU cut only sizes, never the schedule or guidance)
        assert (d["steps"], d["noise_level"], d["guidance"]) == (raw["steps"], raw["noise_level"], raw["guidance"])
    sd3_steps, flux_steps = done["sd35m_flow_grpo"]["steps"], done["flux_dev_flow_grpo"]["steps"]
    assert done["sd35m_flow_grpo"]["nfe"] == 2 * sd3_steps * 2    # 2 trajectories x steps x CFG 2
    assert done["flux_dev_flow_grpo"]["nfe"] == 2 * flux_steps    # one forward per sample: guidance is an input
    qwen_steps = done["qwen_image_flow_grpo"]["steps"]
    assert done["qwen_image_flow_grpo"]["nfe"] == 2 * qwen_steps * 2  # true CFG: [uncond; cond] per sample
