"""The shapes world's learned scorer: captions and hard negatives, loading through the CLIP rewards, ranking,
determinism of its training."""
import os

import numpy as np
import pytest
import torch

from densegrpo_fast.prompts.shapes import ShapesPrompt, all_prompts, load_split
from densegrpo_fast.pretrain import scorer as sc
from densegrpo_fast.pretrain.render import render_with_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.isfile(os.path.join(sc.ASSET, "model.safetensors"))


def test_scene_text_and_template_rebuild_every_prompt():
    for p in all_prompts():
        assert sc.template_of(p).format(x=sc.scene_text(p)) == p.text


def test_hard_negatives_by_kind():
    p = ShapesPrompt("a photo of a red circle and a blue square", "color_attr",
                     [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}])
    neg = sc.hard_negatives(p)
    assert [q.text for q in neg["swap"]] == ["a photo of a blue circle and a red square"]
    assert "a photo of an orange circle and a blue square" in [q.text for q in neg["colour"]]
    assert "a photo of a blue circle and a blue square" not in [q.text for q in neg["colour"]]  # not a swap
    assert "a photo of a red triangle and a blue square" in [q.text for q in neg["shape"]]
    assert neg["count"] == [] and neg["relation"] == []
    p = ShapesPrompt("a circle left of a square", "position", [{"shape": "circle"}, {"shape": "square"}],
                     relation="left of")
    rel = [q.text for q in sc.hard_negatives(p)["relation"]]
    assert rel == ["a circle right of a square", "a circle above a square", "a circle below a square",
                   "a square left of a circle"]
    p = ShapesPrompt("three triangles", "counting", [{"shape": "triangle"}], count=3)
    assert [q.text for q in sc.hard_negatives(p)["count"]] == ["one triangle", "two triangles", "four triangles"]


def test_negatives_are_false_on_the_scene_drawn():
    rng = np.random.default_rng(0)
    for p in load_split("test")[:60]:
        _, placed = render_with_layout(p, rng)
        dets = sc.layout_detections(placed)
        assert sc.holds(p, dets)                       # the scene satisfies its own prompt (verifier's rules)
        for q in sc.negatives_for(p, dets, rng, 3, load_split("train")):
            spec = [x for kind in sc.hard_negatives(p).values() for x in kind if x.text == q]
            assert spec and not sc.holds(spec[0], dets)


def test_training_is_deterministic_per_seed(tmp_path):
    logs = [sc.train_scorer(str(tmp_path / f"s{i}"), seed=3, steps=3, batch=8, hard=2, vae_fraction=0.0,
                            log_every=1, ckpt_every=0) for i in range(2)]
    assert logs[0]["history"][-1]["loss"] == logs[1]["history"][-1]["loss"]
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / f"s{i}" / "model.safetensors")) for i in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "scorer.json"):
        assert (tmp_path / "s0" / f).is_file()


@pytest.mark.skipif(not SHIPPED, reason="the shipped scorer is not in this checkout")
def test_shipped_scorer_loads_as_any_clip_folder_and_ranks_hard_negatives():
    from densegrpo_fast.rewards import CombinedReward
    r = CombinedReward({}, components={"clip_score": {"weight": 1.0, "path": sc.ASSET},
                                       "pickscore": {"weight": 0.0, "path": sc.ASSET}})
    assert os.path.getsize(os.path.join(sc.ASSET, "model.safetensors")) < 10 * 2 ** 20
    rng = np.random.default_rng(123)
    wins, n = 0, 0
    for p in load_split("test")[:36]:                # every category six times
        img, placed = render_with_layout(p, rng)
        dets = sc.layout_detections(placed)
        negs = [q.text for v in sc.hard_negatives(p).values() for q in v if not sc.holds(q, dets)][:4]
        x = torch.from_numpy(img).permute(2, 0, 1).float().div(255)[None].expand(1 + len(negs), -1, -1, -1)
        total, parts = r(x, [p.text] + negs)
        assert torch.allclose(total, parts["clip_score"])
        wins += int((total[0] > total[1:]).sum())
        n += len(negs)
    r.close()
    assert wins / n > 0.8, wins / n


def test_shapes_clip_config_trains_on_the_scorer():
    from densegrpo_fast.config import load_config
    cfg = load_config(os.path.join(ROOT, "configs", "shapes_clip.yaml"))
    comp = cfg.reward.components
    assert list(comp) == ["clip_score"] and os.path.abspath(os.path.join(ROOT, comp["clip_score"]["path"])) == sc.ASSET
    assert cfg.prompts.source == "shapes" and cfg.eval.enabled and cfg.eval.split == "test"


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED, reason="the shipped scorer is not in this checkout")
def test_shapes_clip_smoke_through_train_py(tmp_path):
    """One small epoch of configs/shapes_clip.yaml through train.py: the reward is the scorer, the evaluation reports
    the verifier's held-out accuracy and the scorer on the test prompts."""
    import json
    import subprocess
    import sys
    run = str(tmp_path / "run")
    cmd = [sys.executable, "train.py", "--config", "configs/shapes_clip.yaml", "--run-dir", run,
           "--set", "run.epochs=1", "--set", "run.progress=false", "--set", "train.prompts_per_epoch=1",
           "--set", "train.group_size=2", "--set", "eval.max_prompts=6", "--set", "eval.samples_per_prompt=1",
           "--set", "sampling.eval_steps=3", "--set", "sampling.steps=3", "--set", "run.save_every=0",
           "--set", "eval.grid=false"]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl")) if x.strip()]
    before, after = rows[0], rows[-1]
    for row in (before, after):
        assert 0.0 <= row["eval_strict_accuracy"] <= 1.0 and -1.0 <= row["eval_reward_mean"] <= 1.0
    assert any("reward" in k for k in rows[1]), sorted(rows[1])
