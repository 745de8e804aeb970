import subprocess

import pytest

from densegrpo_fast.config import ConfigError, load_config
from conftest import PY, ROOT


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(f"{ROOT}/configs/tiny_jpeg.yaml", ["train.lr=0.5", "sampling.variant=cps", "run.name=x"])
    assert cfg.train.lr == 0.5 and cfg.sampling.variant == "cps" and cfg.run.name == "x"
    assert cfg.model.tiny.resolution == 32


@pytest.mark.parametrize("override,needle", [
    (["train.lrr=1"], "unknown key 'train.lrr'"),
    (["bogus.key=1"], "unknown key 'bogus'"),
    (["sampling.variant=ode"], "sampling.variant: 'ode' is not allowed; choose one of 'sde', 'cps'"),
    (["train.group_size=abc"], "train.group_size: expected an integer"),
    (["train.group_size=1"], "train.group_size: value 1 is out of range"),
    (["train.zero_stage=4"], "train.zero_stage: 4 is not allowed"),
    (["reward.weights={nope: 1}"], "unknown reward 'nope'"),
    (["credit.completion_steps=zero"], "credit.completion_steps"),
    (["model.path=/does/not/exist"], "model.path: folder '/does/not/exist' does not exist"),
    # a branch step that is never trained (sampling.steps=6, fraction 0.5 -> steps 0..2 trained) is rejected
    (["credit.method=branching", "credit.branches=2", "credit.branch_steps=[0,4]", "train.timestep_fraction=0.5"],
     "credit.branch_steps: [4] outside the trained steps 0..2"),
    (["credit.method=branching", "credit.branches=2", "credit.branch_steps=[0]", "credit.window=2"],
     "credit.window: the SDE window (Flow-GRPO-Fast) does not apply"),
    (["model.resolution=4"], "model.resolution: value 4 is out of range"),
    (["model.text_cache_size=0"], "model.text_cache_size"),
    (["eval.batch=-1"], "eval.batch: value -1 is out of range"),
    (["train.old_log_prob=fresh"], "train.old_log_prob: 'fresh' is not allowed"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(f"{ROOT}/configs/tiny_jpeg.yaml", override)
    assert needle in str(exc.value)


def test_broken_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.slow
def test_cli_fails_before_work_with_the_key(tmp_path):
    r = subprocess.run([PY, "train.py", "--config", "configs/tiny_jpeg.yaml", "--set", "train.unknown=3",
                        "--run-dir", str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "unknown key 'train.unknown'" in r.stderr
    assert not (tmp_path / "r").exists()
