"""End-to-end runs through the real CLI: one process, two DeepSpeed ranks (gloo), kill -9 and resume."""
import json
import math
import os
import subprocess

import pytest
import torch

from conftest import PY, ROOT

BASE = ["--config", "configs/tiny_jpeg.yaml", "--set", "run.progress=false", "--set", "sampling.steps=4",
        "--set", "train.prompts_per_epoch=2", "--set", "train.group_size=4"]


def _run(args, env_extra=None, launcher=None, check=True, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    cmd = (launcher or [PY]) + ["train.py"] + BASE + args
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


KEYS = ["epoch", "wall_s", "reward_mean", "reward_std", "reward/jpeg_compressibility_mean",
        "reward/jpeg_compressibility_std", "loss", "kl", "clipfrac", "rollout_s", "reward_s",
        "train_s", "images_per_s"]


def _shm_buffers(port: int) -> list:
    """DeepSpeed's CPU all-reduce workspaces of the run on `port` (other runs on the machine have other ports)."""
    import glob
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


@pytest.mark.slow
def test_two_epochs_single_process(tmp_path):
    run = str(tmp_path / "run")
    from densegrpo_fast.train.distributed import _free_port
    port = _free_port()
    # DeepSpeed's CPU all-reduce workspace is not left behind in /dev/shm. Its name is planted first (DeepSpeed
    # opens an existing one): this fails if the run used another port or left the workspace.
    planted = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0"
    open(planted, "wb").close()
    try:
        _run(["--run-dir", run, "--set", "run.epochs=2"],
             env_extra={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        assert _shm_buffers(port) == []
    finally:
        if os.path.exists(planted):
            os.unlink(planted)
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert all(k in r for k in KEYS), set(KEYS) - set(r)
        assert all(isinstance(r[k], (int, float)) for k in KEYS)
    assert rows[0]["nfe"] == 8 * 4 * 2  # 8 trajectories x 4 steps x CFG 2 in the rollout
    assert os.path.exists(os.path.join(run, "config.yaml"))
    assert os.listdir(os.path.join(run, "tb"))
    assert os.path.exists(os.path.join(run, "lora", "pytorch_lora_weights.safetensors"))
    with open(os.path.join(run, "checkpoints", "latest")) as f:
        assert f.read().strip() == "epoch-00001"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_ranks_share_advantages(tmp_path, stage):
    run = str(tmp_path / "ds")
    before = set(_shm_buffers(29617 + stage))  # a run killed in its start-up could have left one
    _run(["--run-dir", run, "--set", "run.epochs=2", "--set", "run.debug_dump=true", "--set",
          f"train.zero_stage={stage}"], launcher=[os.path.join(os.path.dirname(PY), "deepspeed"), "--num_gpus", "2",
                                                  "--master_port", str(29617 + stage)])
    from safetensors.torch import load_file
    lora = load_file(os.path.join(run, "lora", "pytorch_lora_weights.safetensors"))
    assert lora and all(v.numel() > 0 for v in lora.values())  # ZeRO-3: gathered, not the empty partitions
    for e in (0, 1):
        a = torch.load(os.path.join(run, "debug", f"credit_e{e}_rank0.pt"))
        b = torch.load(os.path.join(run, "debug", f"credit_e{e}_rank1.pt"))
        assert a["scores"].shape[0] == 8  # the group of 4 spans... all 8 trajectories gathered on each rank
        assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["advantages"], b["advantages"])
        # rank 0 and rank 1 contributed different trajectories
        assert not torch.equal(a["scores"][:4], a["scores"][4:])
    assert set(_shm_buffers(29617 + stage)) <= before  # neither rank leaves its shared-memory workspace behind
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1]
    if stage == 3:  # the rollout gathers the partitioned weights once per rank, no per-module fetches inside it
        assert all(r["zero3_rollout_gathers"] == 2 and r["zero3_rollout_fetches"] == 0 for r in rows), rows
    else:
        assert all("zero3_rollout_fetches" not in r for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("fault,threads", [("after_epoch:1", 1), ("after_epoch:1", 2), ("in_checkpoint:1", 2)])
def test_kill_and_resume_matches_uninterrupted(tmp_path, fault, threads):
    """The resumed run's numbers equal the uninterrupted run's. The text cache is not in the checkpoint, so the
    resumed run encodes its prompts in other company than the first run did: this holds only because a prompt's
    embedding does not depend on its batch. 1 and 2 threads pick different CPU kernels."""
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    args = ["--set", "run.epochs=3", "--set", "train.beta_kl=0.01"]
    env = {"OMP_NUM_THREADS": str(threads)}
    _run(["--run-dir", ref] + args, env_extra=env)
    r = _run(["--run-dir", cut] + args, env_extra={"DENSEGRPO_FAULT": fault, **env}, check=False)
    assert r.returncode == -9, r.stderr[-2000:]
    with open(os.path.join(cut, "checkpoints", "latest")) as f:
        # killed inside the epoch-1 checkpoint: the previous one stays the latest and intact
        assert f.read().strip() == ("epoch-00001" if fault.startswith("after") else "epoch-00000")
    _run(["--run-dir", cut, "--resume"] + args, env_extra=env)
    a, b = _metrics(ref), _metrics(cut)
    assert [x["epoch"] for x in b] == [0, 1, 2]
    for x, y in zip(a, b):
        for k in ("reward_mean", "reward_std", "loss", "kl", "clipfrac", "approx_kl"):
            assert abs(x[k] - y[k]) <= 1e-6 * max(1.0, abs(x[k])), (k, x[k], y[k])


@pytest.mark.slow
def test_resume_without_checkpoint_is_an_error(tmp_path):
    r = _run(["--run-dir", str(tmp_path / "none"), "--resume"], check=False)
    assert r.returncode != 0 and "no checkpoint under" in r.stderr


@pytest.mark.slow
def test_every_credit_method_runs_an_epoch(tmp_path):
    """dense (n = remaining and n = 1), turning point, branching with noise-aware weights, Flow-GRPO-Fast window."""
    cases = {
        "dense": ["credit.method=dense"],
        "dense_n1": ["credit.method=dense", "credit.completion_steps=1"],
        "dense_s2": ["credit.method=dense", "credit.score_stride=2"],
        "tp": ["credit.method=turning_point"],
        "branch": ["credit.method=branching", "credit.branch_steps=[0,1]", "credit.branches=2",
                   "credit.noise_aware_weights=true"],
        "fast": ["credit.window=2"],
    }
    T, B = 4, 8  # sampling.steps and trajectories per epoch in BASE
    for name, sets in cases.items():
        run = str(tmp_path / name)
        args = ["--run-dir", run, "--set", "run.epochs=1", "--set", "run.save_every=0"]
        for s in sets:
            args += ["--set", s]
        _run(args)
        r = _metrics(run)[0]
        assert math.isfinite(r["loss"]) and r["micro_steps"] >= 1, name
        # rollout and the first training micro-batch (before any optimizer step) agree: importance ratio 1
        assert 0.0 <= r["ratio_dev_first"] <= 1e-5, (name, r["ratio_dev_first"])
        if name == "dense":   # rollout B*T*2 + completions B*T(T-1)/2*2 network evaluations, B*(T+1) decodes
            assert r["nfe"] == B * T * 2 + B * T * (T - 1) // 2 * 2 and r["decodes"] == B * (T + 1)
            assert len(r["gain_pos_frac"]) == T
        if name == "dense_n1":
            assert r["completion_nfe"] == 0 and r["nfe"] == B * T * 2
        if name == "dense_s2":  # completions from k = 0, 2 only: (T-1) + (T-3) new forwards, Q_0, Q_2, Q_T decoded
            assert r["nfe"] == B * T * 2 + B * ((T - 1) + (T - 3)) * 2 and r["decodes"] == B * 3
            assert len(r["gain_pos_frac"]) == T
        if name == "tp":
            assert "turning_point_frac" in r
        if name == "branch":  # 2 prompts x (4/2 seeds) x 2 steps x 2 branches = 16 rows, one trained step each
            assert r["decodes"] == 16


DS = [os.path.join(os.path.dirname(PY), "deepspeed"), "--num_gpus", "2"]


@pytest.mark.slow
def test_budget_decision_is_agreed_when_one_rank_runs_slow(tmp_path):
    """Rank 1 sleeps 15 s after each epoch, so its clock passes the 8 s budget after epoch 0 while rank 0's is far
    below it. Decided per rank, rank 1 would stop and rank 0 would wait in epoch 1's collectives (a hang). Agreed
    (the largest clock), both stop after epoch 0, write the same checkpoint and exit 0."""
    run = str(tmp_path / "slow")
    r = _run(["--run-dir", run, "--set", "run.epochs=4", "--set", "run.wall_clock_budget_s=8",
              "--set", "run.collective_timeout_s=120"],
             env_extra={"DENSEGRPO_FAULT": "slow_rank:1:15"}, launcher=DS + ["--master_port", "29631"], timeout=300)
    rows = _metrics(run)
    assert [x["epoch"] for x in rows] == [0]
    assert rows[0]["wall_s"] >= 15  # the agreed clock is the slow rank's
    with open(os.path.join(run, "checkpoints", "latest")) as f:
        assert f.read().strip() == "epoch-00000"
    assert "wall-clock budget 8 s reached after epoch 0" in r.stdout + r.stderr


@pytest.mark.slow
def test_reward_failure_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    """A reward that raises on rank 1 only: both processes exit non-zero before the 300 s collective timeout could
    fire (a hang would outlast the subprocess's 280 s limit and fail the test), and the log carries the reward's
    message from both ranks' point of view."""
    run = str(tmp_path / "fail")
    r = _run(["--run-dir", run, "--set", "run.epochs=2", "--set", "run.collective_timeout_s=300"],
             env_extra={"DENSEGRPO_FAULT": "reward_error:1"}, launcher=DS + ["--master_port", "29633"],
             check=False, timeout=280)
    log = r.stdout + r.stderr
    assert r.returncode != 0
    assert "reward 'jpeg_compressibility' failed" in log and "injected failure" in log
    assert "failed on another rank — rank 1: RewardError" in log  # what rank 0 raised
    assert not os.path.exists(os.path.join(run, "metrics.jsonl"))  # no epoch was logged as if it had succeeded


def _lora(run):
    from safetensors.torch import load_file
    return load_file(os.path.join(run, "lora", "pytorch_lora_weights.safetensors"))


@pytest.mark.slow
def test_two_ranks_train_the_same_weights_as_one(tmp_path):
    """The same global batch and seed on 1 and on 2 ranks give the same LoRA weights after an epoch: trajectory noise
    is keyed by global index, each optimizer window's gradient is the mean over its valid pairs on all ranks
    (micro_batch 8 on one rank = 4 + 4 on two), KL included. Tolerance: 1e-3 of the update's norm (rollout and
    training batches are composed differently, so fp32 sums differ in the last bits; Adam's first step is close
    to lr * sign(g), which can amplify a near-zero gradient element)."""
    common = ["--set", "run.epochs=1", "--set", "run.save_every=0", "--set", "sampling.sample_batch=4",
              "--set", "train.optimizer_steps_per_epoch=1", "--set", "train.beta_kl=0.01"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run(["--run-dir", one, "--set", "train.micro_batch=8"] + common)
    _run(["--run-dir", two, "--set", "train.micro_batch=4"] + common, launcher=DS + ["--master_port", "29635"])
    a, b = _lora(one), _lora(two)
    assert a.keys() == b.keys()
    ups = [k for k in a if "lora_B" in k]  # lora_B starts at zero: its value is the update
    num = sum(float((a[k] - b[k]).double().norm() ** 2) for k in ups) ** 0.5
    den = sum(float(a[k].double().norm() ** 2) for k in ups) ** 0.5
    assert den > 1e-4, den  # training moved the weights
    assert num <= 1e-3 * den, (num, den)
    ma, mb_ = _metrics(one)[0], _metrics(two)[0]
    assert abs(ma["reward_mean"] - mb_["reward_mean"]) <= 1e-6
    assert abs(ma["loss"] - mb_["loss"]) <= 1e-6 * max(1.0, abs(ma["loss"])) + 1e-9


@pytest.mark.slow
def test_ratio_dev_first_measures_a_rollout_training_mismatch(tmp_path):
    """ratio_dev_first is not vacuous: with the stored old log-probs shifted by +1e-3 it reads 1 - e^-1e-3."""
    script = f"""
import torch
from densegrpo_fast.config import load_config
from densegrpo_fast.train.trainer import Trainer
cfg = load_config("configs/tiny_jpeg.yaml", ["run.progress=false", "run.save_every=0", "sampling.steps=4",
                                             "train.prompts_per_epoch=2"])
tr = Trainer(cfg, {str(tmp_path / 'run')!r})
orig = tr.credit.rollout
def shifted(*a, **k):
    r = orig(*a, **k)
    r.log_probs += 1e-3
    return r
tr.credit.rollout = shifted
print("RATIO", tr.run_epoch(0)["ratio_dev_first"])
"""
    r = subprocess.run([PY, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    value = float(r.stdout.split("RATIO")[-1])
    assert abs(value - (1 - math.exp(-1e-3))) < 1e-6, value


@pytest.mark.slow
def test_a_rank_that_cannot_see_the_run_folder_stops_the_run_at_start(tmp_path):
    """Multi-node runs need one filesystem: a rank that cannot read rank 0's start-up token (injected) stops every
    rank before any work, with the host and the folder named."""
    run = str(tmp_path / "fs")
    r = _run(["--run-dir", run, "--set", "run.collective_timeout_s=120"],
             env_extra={"DENSEGRPO_FAULT": "node_local_fs:1"}, launcher=DS + ["--master_port", "29637"],
             check=False, timeout=280)
    log = r.stdout + r.stderr
    assert r.returncode != 0
    assert "cannot see the run folder" in log and run in log and "one filesystem shared by every node" in log
    assert not os.path.exists(os.path.join(run, "metrics.jsonl"))


@pytest.mark.slow
def test_evaluations_at_fixed_training_seconds_never_use_more_time(tmp_path):
    """run.eval_every_s = 5 with a 11 s budget; every epoch takes >= 3 s (an injected sleep inside the clock). Each
    point t in {5, 10, 11} is scored on the last state whose training clock is <= t."""
    run = str(tmp_path / "pts")
    _run(["--run-dir", run, "--set", "run.epochs=10", "--set", "run.save_every=0", "--set", "eval.enabled=true",
          "--set", "eval.grid=false", "--set", "run.eval_every_s=5", "--set", "run.wall_clock_budget_s=11"],
         env_extra={"DENSEGRPO_FAULT": "slow_rank:0:3"})
    rows = _metrics(run)
    pts = [r for r in rows if "eval_point_s" in r]
    train = {r["epoch"]: r for r in rows if "eval_point_s" not in r and r["epoch"] >= 0}
    assert [p["eval_point_s"] for p in pts] == [5, 10, 11]
    for p in pts:
        assert p["wall_s"] <= p["eval_point_s"]                       # never more training seconds than the point
        nxt = train.get(p["epoch"] + 1)                               # the epoch after the scored state crossed it
        assert nxt is not None and nxt["wall_s"] >= p["eval_point_s"]
        assert p["wall_s"] == (train[p["epoch"]]["wall_s"] if p["epoch"] >= 0 else 0.0)


@pytest.mark.slow
def test_recomputed_old_log_probs_give_ratio_one_in_bf16(tmp_path):
    """train.old_log_prob=recompute evaluates the old policy in the training layout (split CFG forwards), so before
    the first update the ratio is exactly 1, in bf16 too; the rollout's stored log-probs stay within 1e-3."""
    rows = {}
    for mode in ("rollout", "recompute"):
        run = str(tmp_path / mode)
        _run(["--run-dir", run, "--set", "run.epochs=1", "--set", "run.save_every=0", "--set", "model.dtype=bfloat16",
              "--set", f"train.old_log_prob={mode}"])
        rows[mode] = _metrics(run)[0]
    assert rows["recompute"]["ratio_dev_first"] == 0.0
    assert rows["rollout"]["ratio_dev_first"] <= 1e-3
    assert rows["recompute"]["train_nfe"] > rows["rollout"]["train_nfe"]  # the extra no-grad pass is counted


@pytest.mark.slow
def test_default_job_on_the_shipped_model_logs_the_paired_gain_over_base(tmp_path):
    """configs/shapes_default.yaml (Flow-GRPO credit, the shipped model, the shapes split) for one small epoch: evaluation
    before and after on the same balanced prompts and noise, and the paired difference to the base with its CI."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run = str(tmp_path / "run")
    cmd = [PY, "train.py", "--config", "configs/shapes_default.yaml", "--run-dir", run, "--set", "run.epochs=1",
           "--set", "run.progress=false", "--set", "train.prompts_per_epoch=2", "--set", "train.group_size=4",
           "--set", "eval.max_prompts=12", "--set", "eval.samples_per_prompt=1", "--set", "sampling.eval_steps=4",
           "--set", "run.save_every=0"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = _metrics(run)
    before, after = rows[0], rows[-1]
    assert before["epoch"] == -1 and "eval_diff_base" not in before
    d = after["eval_diff_base"]
    assert abs(d - (after["eval_strict_accuracy"] - before["eval_strict_accuracy"])) < 1e-9
    assert after["eval_diff_base_ci_lo"] <= d <= after["eval_diff_base_ci_hi"]
    summary = r.stdout.split("== summary ==")[-1]   # the run ends with one summary block
    assert f"paired gain over the base: {d:+.3f}" in summary and os.path.join(run, "lora") in summary, r.stdout[-2000:]
    rec = json.load(open(os.path.join(run, "evals", "epoch-1.json")))
    assert sorted(rec["categories"]) == sorted(["single_object", "two_object", "counting", "colors", "position",
                                                "color_attr"] * 2)   # 12 prompts: two of every category


@pytest.mark.slow
def test_base_evaluation_is_reused_only_for_identical_inputs(tmp_path):
    """eval.base_cache: a second run with the same model, code and evaluation settings (another seed and method)
    reuses the evaluation before training (same figures, same per-image record, no images generated); a change of
    an evaluation setting is a miss and gets its own entry."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cache = str(tmp_path / "cache")

    def run(name, *sets):
        cmd = [PY, "train.py", "--config", "configs/shapes_default.yaml", "--run-dir", str(tmp_path / name),
               "--set", "run.epochs=1", "--set", "run.progress=false", "--set", "train.prompts_per_epoch=1",
               "--set", "train.group_size=2", "--set", "eval.max_prompts=6", "--set", "eval.samples_per_prompt=1",
               "--set", "sampling.eval_steps=3", "--set", "run.save_every=0", "--set", "sampling.steps=3",
               "--set", "eval.grid=false", "--set", f"eval.base_cache={cache}"]
        for s in sets:
            cmd += ["--set", s]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        rec = json.load(open(os.path.join(tmp_path / name, "evals", "epoch-1.json")))
        return _metrics(str(tmp_path / name))[0], rec, r.stdout

    first, rec1, log1 = run("a")
    assert "before training: reused" not in log1 and len(os.listdir(cache)) == 1
    second, rec2, log2 = run("b", "run.seed=7", "credit.method=sparse", "model.lora.r=4")
    assert "evaluation before training: reused" in log2
    assert second == first and rec2 == rec1
    third, rec3, log3 = run("c", "sampling.eval_steps=4")
    assert "before training: reused" not in log3 and len(os.listdir(cache)) == 2
    assert rec3["prompts"] == rec1["prompts"] and rec3["pairs"] == rec1["pairs"]
