"""Network work that is not thrown away, counted through the real tiny SD3 transformer: the completions a
deterministic step makes copies of, the reference forward of the no-grad recompute pass, the K branches of one z_k
in TempFlow-GRPO's training pass; the values those forwards gave are unchanged. And one agreed finiteness check
per optimizer window, not per micro-step."""
import json
import os
import subprocess

import pytest
import torch
from diffusers import SD3Transformer2DModel

from conftest import PY, ROOT, sd3, sd3_cond
from densegrpo_fast.config import ConfigError, load_config
from densegrpo_fast.rollout.completions import (completion_origins, completion_schedule, dense_rollout,
                                                naive_completions)
from densegrpo_fast.rollout.sampler import GuidedVelocity, sde_rollout
from densegrpo_fast.rollout.schedule import flow_sigmas


def _cond(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return sd3_cond(*(torch.randn(B, *s, generator=g, dtype=torch.float64) for s in [(3, 16), (8,), (3, 16), (8,)]))


# ------------------------------------------------------------------------------ zero noise levels: completions
@pytest.mark.parametrize("n", [None, 2])
@pytest.mark.parametrize("levels", [[0.7, 0.0, 0.7, 0.0, 0.0, 0.7], [0.7, 0.7, 0.0, 0.7, 0.0, 0.0]])
def test_a_deterministic_step_reuses_the_next_completion(net, n, levels):
    """A step of level 0 makes z_{k+1} the first Euler step of z_k's completion: that completion is the one from
    z_{k+1} (or z_T) and is not run. Values: the naive per-k loop from the same path (fp64); forwards: only the
    completions that are not copies (the staircase ran B T (T-1) / 2 new ones per batch for n = remaining)."""
    model, calls = net
    B, T = 2, len(levels)
    sig = flow_sigmas(T).double()
    lv = torch.tensor(levels, dtype=torch.float64)
    z0 = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    calls.clear()
    dr = dense_rollout(GuidedVelocity(model, 3.0, sd3()), _cond(B), z0, sig, lv, torch.Generator().manual_seed(3), n)
    counted = sum(calls)
    plain = sde_rollout(GuidedVelocity(model, 3.0, sd3()), _cond(B), z0, sig, lv, torch.Generator().manual_seed(3))
    torch.testing.assert_close(dr.trajectory.latents, plain.latents, rtol=1e-12, atol=1e-12)
    naive = naive_completions(GuidedVelocity(model, 3.0, sd3()), _cond(B), dr.trajectory.latents, sig, n)
    assert (dr.completions - naive).abs().max().item() < 1e-10
    origin = completion_origins(sig, lv, list(range(T)), n)
    run = sorted({m for m in origin.values() if m < T})
    new = B * sum(len(completion_schedule(sig, m, n)) - 2 for m in run)
    before = B * sum(len(completion_schedule(sig, k, n)) - 2 for k in range(T))  # every start run
    assert counted == 2 * (B * T + new) and dr.new_nfe == 2 * new
    assert new < before
    if n is None:  # remaining: every zero step's completion is a copy
        assert run == [k for k in range(T) if levels[k] != 0]


def test_completion_origins_rules():
    sig = flow_sigmas(6)
    lv = torch.tensor([0.7, 0.0, 0.7, 0.0, 0.0, 0.7])
    assert completion_origins(sig, lv, list(range(6))) == {0: 0, 1: 2, 2: 2, 3: 5, 4: 5, 5: 5}
    assert completion_origins(sig, torch.tensor([0.7] * 5 + [0.0]), [4, 5]) == {4: 4, 5: 6}  # z_T itself
    assert completion_origins(sig, lv, [0, 3], sde=False) == {0: 6, 3: 6}                     # an ODE path
    per_row = torch.tensor([[0.7, 0.0, 0.7, 0.7, 0.7, 0.7], [0.7, 0.7, 0.7, 0.7, 0.7, 0.7]])
    assert completion_origins(sig, per_row, [1]) == {1: 1}  # a copy only where every row's step is deterministic
    # a fixed n whose sub-schedule from k does not continue as k+1's: no copy
    assert completion_schedule(sig, 1, 1) == [1, 6] and completion_origins(sig, lv, [1], 1) == {1: 1}


def test_fp32_zero_level_completions_are_bitwise_the_copies(net):
    """fp32, the torch ops: the completion a zero-level step used to run equals its copy to the last bit (the
    first Euler step of the completion is the SDE step with level 0)."""
    model, _ = net
    m32 = SD3Transformer2DModel.from_config(model.config).float().eval()
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    B, T = 2, 5
    sig = flow_sigmas(T)
    lv = torch.tensor([0.7, 0.0, 0.7, 0.0, 0.7])
    cond = sd3_cond(*(t.float() for t in _cond(B).tensors()))
    z0 = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    from densegrpo_fast import ops
    ops.set_backend("torch")
    try:
        dr = dense_rollout(GuidedVelocity(m32, 3.0, sd3()), cond, z0, sig, lv, torch.Generator().manual_seed(3))
        naive = naive_completions(GuidedVelocity(m32, 3.0, sd3()), cond, dr.trajectory.latents, sig, None, [1, 3])
    finally:
        ops.set_backend("auto")
    assert torch.equal(dr.completions[:, 1], dr.completions[:, 2]) and torch.equal(dr.completions[:, 3],
                                                                                    dr.completions[:, 4])
    assert (naive - dr.completions[:, [1, 3]]).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", ["dense", "turning_point"])
def test_window_with_a_completion_method_is_rejected(method):
    with pytest.raises(ConfigError, match=r"credit\.window: 2 is for credit\.method=sparse"):
        load_config("configs/tiny_jpeg.yaml", [f"credit.method={method}", "credit.window=2"])
    assert load_config("configs/tiny_jpeg.yaml", ["credit.method=sparse", "credit.window=2"]).credit.window == 2


# ------------------------------------------------------------------------------ the training pass (a Trainer)
SCRIPT = r"""
import copy, json, os, sys
import torch
from densegrpo_fast import ops
from densegrpo_fast.config import load_config
import densegrpo_fast.train.trainer as T
import densegrpo_fast.train.objective as O
out = sys.argv[1]
BASE = ["run.progress=false", "run.save_every=0", "sampling.steps=4", "train.prompts_per_epoch=1",
        "train.beta_kl=0.01", "train.old_log_prob=recompute", "train.drop_zero_advantage=false"]
res = {}

def trainer(name, extra):
    return T.Trainer(load_config("configs/tiny_jpeg.yaml", BASE + extra), os.path.join(out, name))

def counting(tr):
    rows = []
    tr.engine.module.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]),
                                               with_kwargs=True)
    return rows

def train_epoch(tr, rows):
    ids = tr.epoch_prompts(0)
    with torch.no_grad():
        r = tr.credit.rollout(tr.ctx, ids, 0)
    scores = r.wait_rewards()
    adv, _ = tr.credit.advantages(scores, torch.arange(tr.n_global) // tr.credit.group_size(4), tr.cfg.train)
    tr.engine.module.train()
    checks = []
    orig = T.raise_if_any_failed
    T.raise_if_any_failed = lambda *a, **k: (checks.append(1), orig(*a, **k))[1]
    rows.clear()
    try:
        st = tr._train(0, r, adv, ids)
    finally:
        T.raise_if_any_failed = orig
    return r, adv, ids, st, sum(rows), len(checks)

# ---- sparse: recompute with beta_kl > 0 runs no reference forward in the no-grad pass
tr = trainer("sparse", ["credit.method=sparse", "train.micro_batch=4", "train.optimizer_steps_per_epoch=2"])
rows = counting(tr)
r, adv, ids, st, n, checks = train_epoch(tr, rows)
pairs = tr.n_local * tr.n_train_steps
res["sparse"] = {"rows": n, "train_nfe": st["train_nfe"], "pairs": pairs, "micro_steps": st["micro_steps"],
                 "ratio_dev_first": st["ratio_dev_first"], "checks": checks}
idx = torch.stack([torch.arange(4), torch.tensor([0, 1, 2, 0])], 1)
prompts = [tr.train_prompts[i] for i in ids.tolist()]
with torch.no_grad():
    a = tr._micro_batch_logprob(r, idx, prompts, False)
    b = tr._micro_batch_logprob(r, idx, prompts, False, reference=False)
res["sparse"]["lp_equal"] = bool(torch.equal(a[0], b[0]))
res["sparse"]["kl_nonzero"] = bool((a[1] != 0).any())

# ---- branching: the K branches of one z_k share one forward (policy, reference and recompute)
tr = trainer("branching", ["credit.method=branching", "credit.branches=4", "credit.branch_steps=[0,1]",
                           "train.micro_batch=8", "train.optimizer_steps_per_epoch=1"])
rows = counting(tr)
r, adv, ids, st, n, checks = train_epoch(tr, rows)
res["branching"] = {"rows": n, "train_nfe": st["train_nfe"], "pairs": int(r.train_mask.sum()),
                    "micro_steps": st["micro_steps"], "ratio_dev_first": st["ratio_dev_first"], "checks": checks,
                    "states": len({(int(r.state_rows[i]), int(k)) for i, k in r.train_mask.nonzero().tolist()})}
# values in fp64: a micro-batch with shared states against the same pairs each evaluated alone
tr.engine.module.double()
orig_cond = tr.ctx.conditioning
tr.ctx.conditioning = lambda p: orig_cond(p).from_tensors(t.double() for t in orig_cond(p).tensors())
r64 = copy.copy(r)
r64.latents = r.latents.double()
alone = copy.copy(r64)
alone.state_rows = None
pairs = O.state_grouped(r.train_mask.nonzero(), r.state_rows)
prompts = [tr.train_prompts[i] for i in ids.tolist()]
A = adv.double()
w = torch.ones(pairs.shape[0], dtype=torch.float64)
params = [p for p in tr.engine.module.parameters() if p.requires_grad]
vals = {}
for name, ro in (("shared", r64), ("alone", alone)):
    rows.clear()
    lp, kl = tr._micro_batch_logprob(ro, pairs, prompts, True)
    loss, _, _ = ops.grpo_loss(lp, lp.detach() - 1e-3, A[pairs[:, 0], pairs[:, 1]], w, 1e-2, kl, 0.01)
    g = torch.autograd.grad(loss, params)
    vals[name] = (lp.detach(), kl.detach(), loss.detach(), torch.cat([x.flatten() for x in g]), sum(rows))
d = {k: float((vals["shared"][j] - vals["alone"][j]).abs().max()) for j, k in enumerate(["lp", "kl", "loss", "grad"])}
res["branching"].update(fp64_diff=d, fp64_rows={k: v[4] for k, v in vals.items()},
                        grad_norm=float(vals["alone"][3].norm()), lp_scale=float(vals["alone"][0].abs().max()))
ordered = O.state_grouped(pairs[torch.randperm(pairs.shape[0])], r.state_rows)
keys = [(int(r.state_rows[i]), int(k)) for i, k in ordered.tolist()]
res["branching"]["contiguous"] = all(keys.index(x) == i or keys[i - 1] == x for i, x in enumerate(keys))

# ---- a NaN loss: one check per optimizer window, the micro-batch named
os.environ["DENSEGRPO_FAULT"] = "nan_loss:0"
tr = trainer("nan", ["credit.method=sparse", "train.micro_batch=4", "train.optimizer_steps_per_epoch=2"])
try:
    tr.run_epoch(0)
    res["nan"] = "no error"
except T.NonFiniteLossError as exc:
    res["nan"] = str(exc)
print("RESULT", json.dumps(res), flush=True)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("forwards"))
    env = {k: v for k, v in os.environ.items() if k != "DENSEGRPO_FAULT"}
    r = subprocess.run([PY, "-c", SCRIPT, out], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(env, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.split("RESULT", 1)[1])


def test_recompute_pass_runs_no_reference_forward(trained):
    """old_log_prob=recompute with beta_kl > 0: per pair (CFG 2) the no-grad recompute, the policy and the
    reference forward, 3 x 2 rows (the recompute pass also ran the reference: 4 x 2); train_nfe is that count;
    the recomputed log-prob is the one the reference forward never changed."""
    s = trained["sparse"]
    padded = s["micro_steps"] * 4
    assert s["rows"] == 3 * 2 * padded and s["train_nfe"] == s["rows"]
    assert s["lp_equal"] and s["kl_nonzero"]
    assert s["ratio_dev_first"] == 0.0


def test_branches_of_one_state_share_one_forward(trained):
    """TempFlow-GRPO, K = 4 branches at 2 steps of one seed: 8 pairs, 2 distinct states. Each pass (recompute,
    policy, reference) runs 2 states x CFG 2 = 4 rows, not 8 x 2 = 16 (the recompute pass also ran the reference)."""
    b = trained["branching"]
    assert b["pairs"] == 8 and b["states"] == 2 and b["micro_steps"] == 1
    assert b["rows"] == 3 * 2 * b["states"] and b["train_nfe"] == b["rows"]
    assert b["ratio_dev_first"] == 0.0
    assert b["fp64_rows"] == {"shared": 2 * 2 * b["states"], "alone": 2 * 2 * b["pairs"]}
    d = b["fp64_diff"]
    assert d["lp"] <= 1e-12 * max(1.0, b["lp_scale"]) and d["kl"] <= 1e-12 and d["loss"] <= 1e-12
    assert d["grad"] <= 1e-10 * max(1.0, b["grad_norm"])
    assert b["contiguous"]


def test_one_finiteness_check_per_optimizer_window(trained):
    """The agreed check runs once per optimizer window (2 per epoch here), not once per micro-step; a NaN loss
    still stops the run naming the micro-batch and its steps."""
    s = trained["sparse"]
    assert s["micro_steps"] > 2 and s["checks"] == 2
    assert trained["branching"]["checks"] == 1
    assert trained["nan"].startswith("epoch 0, micro-batch 0: loss is nan (steps [")


@pytest.mark.slow
def test_nan_loss_on_one_rank_stops_every_rank_naming_it(tmp_path):
    """A loss that is NaN on rank 1 only: both ranks stop at the window's agreed check (no hang), rank 0 names
    rank 1 and its error, and no epoch is logged."""
    run = str(tmp_path / "nan")
    ds = [os.path.join(os.path.dirname(PY), "deepspeed"), "--num_gpus", "2", "--master_port", "29639"]
    cmd = ds + ["train.py", "--config", "configs/tiny_jpeg.yaml", "--run-dir", run, "--set", "run.progress=false",
                "--set", "sampling.steps=4", "--set", "train.prompts_per_epoch=2", "--set", "train.group_size=4",
                "--set", "run.epochs=1", "--set", "run.collective_timeout_s=300"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280,
                       env=dict(os.environ, PYTHONUNBUFFERED="1", DENSEGRPO_FAULT="nan_loss:1"))
    log = r.stdout + r.stderr
    assert r.returncode != 0
    assert "failed on another rank — rank 1: NonFiniteLossError: epoch 0, micro-batch 0: loss is nan" in log
    assert not os.path.exists(os.path.join(run, "metrics.jsonl"))


# ------------------------------------------------------------------------------ evaluation batches
def test_evaluation_batch_is_a_speed_setting_only(tiny_model_dir):
    """eval.batch changes how many samples share a forward, not the images (each sample's noise is its own, the
    network is row-independent up to the last bits); a batch that runs out of memory is halved and retried."""
    from densegrpo_fast.config import ModelConfig
    from densegrpo_fast.eval import generate
    from densegrpo_fast.models import build_models
    m = build_models(ModelConfig(path=tiny_model_dir, max_sequence_length=4), "cpu")
    prompts = ["a red circle", "a blue square", "a green circle"]
    pairs = [(i, j) for i in range(3) for j in range(2)]
    args = (m.text, m.decode, m.latent_shape, prompts, pairs, flow_sigmas(3, 3.0), 4.5, 0, "cpu", m.family)
    calls = []
    h = m.transformer.register_forward_pre_hook(
        lambda mod, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    one = generate(m.transformer, *args, batch=1)
    calls.clear()
    big = generate(m.transformer, *args, batch=256)
    assert calls == [2 * len(pairs)] * 3       # one forward (CFG: 2 rows per sample) per step for the whole set
    assert (one - big).abs().max().item() < 1e-5

    def oom_above_two(mod, a, kw):
        if kw["hidden_states"].shape[0] > 4:
            raise torch.OutOfMemoryError("test: out of memory")
    h2 = m.transformer.register_forward_pre_hook(oom_above_two, with_kwargs=True)
    calls.clear()
    try:
        halved = generate(m.transformer, *args, batch=8)
    finally:
        h.remove()
        h2.remove()
    assert max(calls) == 12 and calls[-1] == 4  # 6 samples tried (12 rows), then 4, then 2 per batch
    assert (halved - big).abs().max().item() < 1e-5


def test_auto_evaluation_batch_by_device(tiny_model_dir):
    """eval.batch = 0 (the default) resolves by device type: 32 samples per ODE batch on the CPU, 256 on a GPU; an
    explicit batch is kept. generate() with the default runs the CPU's batch: 40 samples -> forwards of 32 + 8."""
    from densegrpo_fast.config import EvalConfig, ModelConfig
    from densegrpo_fast.eval import generate, resolve_eval_batch
    assert EvalConfig().batch == 0
    assert resolve_eval_batch(0, "cpu") == 32 and resolve_eval_batch(0, torch.device("cuda", 0)) == 256
    assert resolve_eval_batch(7, "cpu") == 7 and resolve_eval_batch(300, "cuda") == 300
    from densegrpo_fast.models import build_models
    m = build_models(ModelConfig(path=tiny_model_dir, max_sequence_length=4), "cpu")
    prompts = ["a red circle", "a blue square"]
    pairs = [(i, j) for i in range(2) for j in range(20)]
    calls = []
    h = m.transformer.register_forward_pre_hook(
        lambda mod, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        auto = generate(m.transformer, m.text, m.decode, m.latent_shape, prompts, pairs, flow_sigmas(2, 3.0), 4.5, 0,
                        "cpu", m.family)
        n_auto = list(calls)
        calls.clear()
        whole = generate(m.transformer, m.text, m.decode, m.latent_shape, prompts, pairs, flow_sigmas(2, 3.0), 4.5,
                         0, "cpu", m.family, batch=64)
    finally:
        h.remove()
    assert n_auto == [64, 64, 16, 16]          # CFG: 2 rows per sample; 2 steps per batch
    assert calls == [80, 80]
    assert auto.shape == whole.shape == (40, 3, *auto.shape[2:])
    assert (auto - whole).abs().max().item() < 1e-5
