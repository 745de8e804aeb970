"""bench/vs_flow_grpo.py without a Flow-GRPO checkout: a clear message, and its own code paths (our side of every
phase, the results file) run."""
import csv
import os
import subprocess

import pytest

from conftest import PY, ROOT

SCRIPT = os.path.join(ROOT, "bench", "vs_flow_grpo.py")


@pytest.mark.slow
def test_without_a_checkout_it_says_what_to_give():
    env = {k: v for k, v in os.environ.items() if k != "FLOW_GRPO_SRC"}
    r = subprocess.run([PY, SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "--flow-grpo-src DIR" in r.stderr
    r = subprocess.run([PY, SCRIPT, "--flow-grpo-src", "/nonexistent"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode != 0 and "is not a Flow-GRPO checkout: missing" in r.stderr


@pytest.mark.slow
def test_our_side_of_every_phase_runs_and_is_recorded(tmp_path):
    out = tmp_path / "results.csv"
    r = subprocess.run([PY, SCRIPT, "--ours-only", "--columns", "best", "--compile", "off", "--rounds", "1", "--steps", "3",
                        "--batch", "2", "--micro-batch", "4", "--prompts", "1", "--group", "2", "--dense-batch", "2",
                        "--text-slots", "4", "--results", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for case in ("rollout B=2", "train step B=4", "epoch N=2", "dense B=2"):
        assert case in r.stdout
    rows = list(csv.DictReader(open(out)))
    assert {row["path"] for row in rows} == {"ours"} and len(rows) == 4
    assert all(float(row["median_ms"]) > 0 for row in rows)


def _bench_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("vs_flow_grpo_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_network_work_is_counted_through_the_eager_transformer():
    """count_rows: rows through S.tr (the eager transformer, swapped in for our compiled one during the count) and
    the rows of them run with autograd; our compiled transformer is put back afterwards, also when fn raises."""
    from types import SimpleNamespace

    import torch
    mod = _bench_module()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, hidden_states):
            return hidden_states * self.w

    compiled = object()
    S = SimpleNamespace(tr=Net(), ours_tr=compiled)

    def fn(_):
        S.ours_tr(hidden_states=torch.zeros(5, 3))        # 5 rows with autograd
        with torch.no_grad():
            S.ours_tr(hidden_states=torch.zeros(7, 3))    # 7 rows without
    assert mod.count_rows(S, fn) == (12, 5) and S.ours_tr is compiled

    def broken(_):
        S.ours_tr(hidden_states=torch.zeros(2, 3))
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        mod.count_rows(S, broken)
    assert S.ours_tr is compiled and not S.tr._forward_pre_hooks
    assert mod.target_of("dense B=4") == 2.5 and mod.target_of("rollout B=8") == 1.5 and mod.target_of("x") is None
