"""The comparison statistics: bootstrap CIs over prompts, paired differences, t-intervals over seeds, verdicts."""
import numpy as np
import pytest

from densegrpo_fast.stats import bootstrap_ci, paired_bootstrap_diff, seed_summary, t975, verdict


def _rows(markdown: str, first: str) -> list:
    """The cells after the first of every markdown table row whose first cell is `first` (spacing-insensitive)."""
    out = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells[0] == first:
            out.append(cells[1:])
    return out


def test_seed_summary_by_hand():
    s = seed_summary([0.30, 0.40, 0.50])
    # mean 0.4; sample std = sqrt(((-.1)^2 + 0 + .1^2) / 2) = 0.1; half = t(2) 0.1 / sqrt(3) = 4.303 * 0.057735
    assert abs(s["mean"] - 0.4) < 1e-12 and abs(s["std"] - 0.1) < 1e-12
    assert abs(s["ci"][1] - 0.4 - 4.303 * 0.1 / 3 ** 0.5) < 1e-9
    assert t975(1) == 12.706 and t975(100) == 1.96


def test_bootstrap_covers_the_truth_at_about_95_percent():
    """Binomial images (p = 0.4), 40 prompts x 2 samples: the 95 % CI contains p in about 95 % of repetitions."""
    rng = np.random.default_rng(1)
    pid = np.repeat(np.arange(40), 2)
    cover = 0
    for rep in range(200):
        x = (rng.random(80) < 0.4).astype(float)
        est, lo, hi = bootstrap_ci(x, pid, n_boot=400, seed=rep)
        assert lo <= est <= hi
        cover += lo <= 0.4 <= hi
    assert 0.88 <= cover / 200 <= 0.99


def test_categories_weigh_equally_and_paired_differences_resolve():
    cats = np.array(["a"] * 4 + ["b"] * 4)
    pid = np.arange(8)
    est, _, _ = bootstrap_ci(np.array([1, 1, 1, 1, 0, 0, 0, 0.0]), pid, cats, n_boot=100)
    assert est == 0.5  # mean over categories, not over images
    rng = np.random.default_rng(0)
    pid = np.repeat(np.arange(60), 2)
    base = (rng.random(120) < 0.3).astype(float)
    better = np.maximum(base, (rng.random(120) < 0.3).astype(float))  # never worse on a pair, often better
    d, lo, hi = paired_bootstrap_diff(better, base, pid, n_boot=500)
    assert d > 0 and verdict(lo, hi) == "resolved better"
    d, lo, hi = paired_bootstrap_diff(base, base, pid, n_boot=200)
    assert d == 0 and verdict(lo, hi) == "not resolved"
    assert verdict(-0.3, -0.1) == "resolved worse"


def test_compare_reports_paired_verdicts(tmp_path):
    """compare's summary from run folders: ddof = 1 spreads, t-intervals and paired verdicts against Flow-GRPO."""
    import json
    import os
    from densegrpo_fast.experiments.compare import paired_verdicts, summarize, write_report
    acc = {"flow_grpo": [0.30, 0.32, 0.28], "tempflow": [0.45, 0.47, 0.44], "dense": [0.31, 0.28, 0.33],
           "tempflow_plain": [0.40, 0.41, 0.41]}
    for m, vals in acc.items():
        for s, a in enumerate(vals):
            d = tmp_path / m / f"seed{s}"
            os.makedirs(d)
            rows = [{"epoch": -1, "wall_s": 0.0, "eval_strict_accuracy": 0.2},
                    {"epoch": 0, "wall_s": 60.0, "reward_mean": 0.5, "kl": 1e-3, "epoch_s": 60.0, "rollout_s": 30.0,
                     "reward_s": 0.0, "train_s": 30.0, "nfe": 100, "train_nfe": 50, "decodes": 8,
                     "eval_strict_accuracy": a, "eval_diff_base": a - 0.2},
                    {"epoch": 0, "eval_point_s": 30.0, "wall_s": 29.0, "eval_strict_accuracy": a - 0.1},
                    {"epoch": 0, "eval_point_s": 60.0, "wall_s": 59.0, "eval_strict_accuracy": a,
                     "eval_diff_base": a - 0.2}]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.makedirs(d / "lora")
            (d / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    # a stopped run (no final weights) is not summarised
    os.makedirs(tmp_path / "dense_n2" / "seed0")
    (tmp_path / "dense_n2" / "seed0" / "metrics.jsonl").write_text(json.dumps(
        {"epoch": 0, "wall_s": 9.0, "reward_mean": 0.5, "kl": 0.0, "epoch_s": 9.0, "rollout_s": 1.0, "reward_s": 0.0,
         "train_s": 1.0, "nfe": 1, "decodes": 1}) + "\n")
    assert "dense_n2" not in summarize(str(tmp_path), ["dense_n2"], [0, 1, 2])
    table = summarize(str(tmp_path), list(acc), [0, 1, 2])
    pv = paired_verdicts(table)
    assert pv["tempflow"]["verdict"] == "resolved better" and abs(pv["tempflow"]["mean"] - 0.153333) < 1e-6
    assert pv["dense"]["verdict"] == "not resolved"
    text = write_report(str(tmp_path), table, list(acc), [0, 1, 2], 60, "densegrpo compare ...")
    assert "| tempflow | 3 |" in text and "resolved better" in text and "not resolved" in text
    assert "0.3 ± 0.02" in text  # flow_grpo: sample std of [0.30, 0.32, 0.28] = 0.02 (ddof = 1)
    assert "gain over base" in text and "| +0.253 (" in text  # tempflow: mean of 0.25, 0.27, 0.24
    # time to Flow-GRPO's final accuracy (0.30): tempflow at the 30 s point on every seed; dense (0.21, 0.18, 0.23 at
    # 30 s, 0.31, 0.28, 0.33 at 60 s) at 60 s on seeds 0 and 2, never on seed 1
    from densegrpo_fast.experiments.compare import time_to_quality
    ttq = time_to_quality(table)
    assert abs(ttq["target"] - 0.30) < 1e-9 and ttq["tempflow"] == [30.0, 30.0, 30.0]
    assert ttq["dense"][0] == 60.0 and ttq["dense"][2] == 60.0 and ttq["dense"][1] == float("inf")
    assert "| tempflow | 30, 30, 30 |" in text and "not reached by 1 of 3 seeds" in text
    # the ablation pair: tempflow - tempflow_plain = 0.05, 0.06, 0.03 per seed (mean 0.0467, sd 0.0153, t_2 = 4.303)
    from densegrpo_fast.experiments.compare import ablations
    ab = ablations(table)
    assert list(ab) == ["tempflow - tempflow_plain"] and ab["tempflow - tempflow_plain"]["verdict"] == "resolved better"
    lo, hi = ab["tempflow - tempflow_plain"]["ci"]
    assert abs(lo - (0.046667 - 4.3027 * 0.015275 / 3 ** 0.5)) < 1e-3 and abs(hi - (0.046667 + 0.037950)) < 1e-3
    assert "| tempflow − tempflow_plain | 3 | +0.047 (+0.009, +0.085) | resolved better |" in text
    # Flow-GRPO's curve to the budget: 0 s (the base, 0.2) -> 30 s (a - 0.1) -> 60 s (a); rise from 30 s is 0.1 on
    # every seed (zero spread: resolved)
    assert "| 30 | 0.200 (" in text and "| 30 | 0.200 (0.150, 0.250) | +0.100 (+0.100, +0.100) | resolved better |" \
        in text and "| 60 | 0.300 (0.250, 0.350) | — | — |" in text
    # --report-only: no run is started; the unfinished one is named and left out
    from densegrpo_fast.experiments.compare import compare_main
    os.remove(tmp_path / "compare.md")
    assert compare_main(["--report-only", "--out", str(tmp_path), "--methods", ",".join(list(acc) + ["dense_n2"]),
                         "--budget-s", "60"]) == 0
    report = (tmp_path / "compare.md").read_text()
    assert "| tempflow | 3 |" in report and "| dense_n2 |" not in report and "--report-only" not in report
    assert not os.path.exists(tmp_path / "dense_n2" / "seed1")
    # --replicate-of: the same runs against their own report reproduce every verdict; a missing file is refused
    # before any run starts
    import shutil
    shutil.copy(tmp_path / "compare.json", tmp_path / "earlier.json")
    assert compare_main(["--report-only", "--out", str(tmp_path), "--methods", ",".join(acc), "--budget-s", "60",
                         "--replicate-of", str(tmp_path / "earlier.json")]) == 0
    rep = json.loads((tmp_path / "compare.json").read_text())["replication"]
    assert rep["tempflow - flow_grpo"]["outcome"] == "reproduced" and rep["dense - flow_grpo"]["outcome"] == \
        "consistent" and rep["tempflow - base"]["outcome"] == "reproduced"
    # the replication table's row: the difference and its verdict
    assert ["+0.047", "resolved better"] in [r[:2] for r in _rows((tmp_path / "compare.md").read_text(),
                                                                     "tempflow − tempflow_plain")]
    assert compare_main(["--out", str(tmp_path / "new"), "--replicate-of", str(tmp_path / "nope.json")]) == 2
    assert not os.path.exists(tmp_path / "new")


def test_archived_run_counts_at_its_budget(tmp_path):
    """A run kept as metrics only (docs/results/ copies carry no weights) is finished once it was scored at the
    budget's point: summarised, and never re-run by `compare`; short of the budget it is not."""
    import json
    from densegrpo_fast.experiments.compare import finished, run_one, summarize
    d = tmp_path / "flow_grpo" / "seed0"
    d.mkdir(parents=True)
    rows = [{"epoch": -1, "wall_s": 0.0, "eval_strict_accuracy": 0.2},
            {"epoch": 0, "wall_s": 80.0, "reward_mean": 0.5, "kl": 1e-3, "epoch_s": 80.0, "rollout_s": 40.0,
             "reward_s": 0.0, "train_s": 40.0, "nfe": 100, "decodes": 8},
            {"epoch": 0, "eval_point_s": 90.0, "wall_s": 80.0, "eval_strict_accuracy": 0.35, "eval_diff_base": 0.15}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert finished(str(d), 90.0) and not finished(str(d), 120.0) and not finished(str(d))
    t = summarize(str(tmp_path), ["flow_grpo"], [0], 90.0)
    assert t["flow_grpo"]["acc_after"] == [0.35] and t["flow_grpo"]["gain"] == [0.15]
    assert t["flow_grpo"]["curve"] == [[(0.0, 0.2), (90.0, 0.35)]]
    assert summarize(str(tmp_path), ["flow_grpo"], [0], 120.0) == {}
    assert not finished(str(d), 60.0) and summarize(str(tmp_path), ["flow_grpo"], [0], 60.0) == {}
    # with its weights written too, a run scored up to 90 s is still not read as a 60 s result
    (d / "lora").mkdir()
    (d / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert summarize(str(tmp_path), ["flow_grpo"], [0], 60.0) == {} and summarize(str(tmp_path), ["flow_grpo"], [0])
    (d / "lora" / "pytorch_lora_weights.safetensors").unlink()
    # "done already": the launcher would fail if it were called
    run_one("c.yaml", "flow_grpo", 0, 90.0, str(d), 30.0, [], ["/nonexistent/python"])


def test_speed_check_flags_runs_at_other_speeds():
    """Equal seconds mean equal training only at one speed: a spread across seeds, or a change against the earlier
    comparison, of more than 25 % in s / epoch is named; within it nothing is."""
    from densegrpo_fast.experiments.compare import speed_check
    t = {"flow_grpo": {"s_per_epoch": [7.0, 7.4, 7.2]}, "tp_grpo": {"s_per_epoch": [17.0, 30.0, 17.5]}}
    w = speed_check(t)
    assert len(w) == 1 and w[0].startswith("tp_grpo: s / epoch 17.0 to 30.0")
    w = speed_check(t, {"flow_grpo": {"s_per_epoch": [12.0, 12.5, 12.2]}, "tp_grpo": {"s_per_epoch": [21.0]}})
    assert any(x.startswith("flow_grpo: s / epoch 7.2 here against 12.2") for x in w) and len(w) == 2
    assert speed_check({"flow_grpo": {"s_per_epoch": [7.0, 8.0]}}, {"flow_grpo": {"s_per_epoch": [8.0]}}) == []


def test_curve_to_budget_by_hand():
    """Flow-GRPO's curve to the budget: the shared points only, mean accuracy per point, and the paired rise to the
    last point (still rising -> resolved better; flat -> not resolved); methods with one seed give nothing."""
    from densegrpo_fast.experiments.compare import curve_to_budget
    curves = [[(0.0, 0.20), (100.0, 0.25), (200.0, 0.30), (300.0, 0.31), (350.0, 0.9)],
              [(0.0, 0.20), (100.0, 0.27), (200.0, 0.33), (300.0, 0.32)],
              [(0.0, 0.20), (100.0, 0.22), (200.0, 0.29), (300.0, 0.30)]]
    out = curve_to_budget({"flow_grpo": {"curve": curves}})
    assert [r["t"] for r in out] == [0.0, 100.0, 200.0, 300.0]  # 350 s is not shared by every seed
    assert abs(out[1]["acc"]["mean"] - 0.74 / 3) < 1e-12 and out[-1]["rise"] is None
    # rise from 100 s: 0.06, 0.05, 0.08 (resolved); from 200 s: 0.01, -0.01, 0.01 (not resolved)
    assert abs(out[1]["rise"]["mean"] - 0.19 / 3) < 1e-12 and out[1]["rise"]["verdict"] == "resolved better"
    assert out[2]["rise"]["verdict"] == "not resolved" and abs(out[2]["rise"]["mean"] - 0.01 / 3) < 1e-12
    assert curve_to_budget({"flow_grpo": {"curve": curves[:1]}}) == [] and curve_to_budget({}) == []


def test_replication_outcomes_by_hand():
    """Each outcome of replication(): a resolved verdict resolved again with its sign, kept in sign only, reversed;
    a not-resolved one staying so or becoming resolved; comparisons only one side has are left out."""
    from densegrpo_fast.experiments.compare import replication
    v = lambda mean, lo, hi: {"mean": mean, "ci": (lo, hi), "verdict": verdict(lo, hi)}
    old = {"a": v(0.1, 0.05, 0.15), "b": v(0.1, 0.05, 0.15), "c": v(-0.1, -0.15, -0.05), "d": v(0.0, -0.1, 0.1),
           "e": v(0.0, -0.1, 0.1), "only_old": v(0.1, 0.05, 0.15)}
    new = {"a": v(0.2, 0.1, 0.3), "b": v(0.05, -0.01, 0.11), "c": v(0.1, 0.05, 0.15), "d": v(0.02, -0.1, 0.14),
           "e": v(-0.2, -0.3, -0.1), "only_new": v(0.0, -1, 1)}
    r = replication(old, new)
    assert {k: x["outcome"] for k, x in r.items()} == {
        "a": "reproduced", "b": "sign kept", "c": "reversed", "d": "consistent", "e": "newly resolved"}
    assert r["c"]["old"] == "resolved worse" and r["c"]["new"] == "resolved better" and r["a"]["new_ci"] == [0.1, 0.3]


def test_diff_to_base_pairs_images_with_the_base_record(tmp_path):
    """eval.diff_to_base: the paired difference to evals/epoch-1.json (same prompts and (prompt, sample) pairs), its
    value by hand (mean over categories of the per-category mean difference) and a CI around it; other images -> {}."""
    import json
    import os
    from densegrpo_fast.eval import diff_to_base
    rng = np.random.default_rng(3)
    prompts = [f"p{i}" for i in range(40)]
    pairs = [(i, j) for i in range(40) for j in range(2)]
    cats = ["a" if i < 10 else "b" for i, _ in pairs]
    base = rng.random(80) < 0.3
    now = base | (rng.random(80) < 0.3)
    os.makedirs(tmp_path / "evals")
    with open(tmp_path / "evals" / "epoch-1.json", "w") as f:
        json.dump({"prompts": prompts, "pairs": pairs, "strict": base.astype(int).tolist()}, f)
    out = diff_to_base(str(tmp_path), 3, prompts, pairs, now, cats)
    c = np.array(cats)
    by_hand = np.mean([(now[c == k].astype(float) - base[c == k]).mean() for k in ("a", "b")])
    assert abs(out["eval_diff_base"] - by_hand) < 1e-12 and by_hand > 0
    assert out["eval_diff_base_ci_lo"] <= by_hand <= out["eval_diff_base_ci_hi"]
    assert out["eval_diff_base_ci_lo"] >= 0          # only gains were added: every resample is >= 0
    assert diff_to_base(str(tmp_path), 3, prompts[::-1], pairs, now, cats) == {}
    assert diff_to_base(str(tmp_path), -1, prompts, pairs, now, cats) == {}


def test_every_compare_preset_is_a_valid_config_of_the_default_job():
    """compare's method presets on configs/shapes_default.yaml: each loads (keys and values validated), sets the
    credit method it names, and the two TempFlow presets differ only in the noise-aware weights."""
    import os
    from densegrpo_fast.experiments.compare import METHODS, OPTIONAL
    from densegrpo_fast.config import load_config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    want = {"flow_grpo": "sparse", "flow_grpo_fast": "sparse", "dense": "dense", "dense_n1": "dense",
            "dense_n2": "dense", "dense_cal": "dense", "dense_zero": "dense", "dense_s2": "dense",
            "tp_grpo": "turning_point",
            "tempflow": "branching", "tempflow_plain": "branching"}
    assert set(METHODS) == set(want) and set(OPTIONAL) <= set(METHODS)
    cfgs = {m: load_config(os.path.join(root, "configs", "shapes_default.yaml"), sets) for m, sets in METHODS.items()}
    for m, cfg in cfgs.items():
        assert cfg.credit.method == want[m], m
    assert cfgs["tempflow"].credit.noise_aware_weights and not cfgs["tempflow_plain"].credit.noise_aware_weights
    assert cfgs["dense_n1"].credit.completion_steps == "1" and cfgs["dense"].credit.completion_steps == "remaining"
    assert cfgs["dense_zero"].credit.zero_gain == "zero" and cfgs["dense"].credit.zero_gain == "normalise"
    assert cfgs["flow_grpo_fast"].credit.window == 3 and cfgs["flow_grpo"].credit.window == 0
    assert cfgs["dense_s2"].credit.score_stride == 2 and cfgs["dense_s2"].credit.completion_steps == "remaining"
    # a stride set before the preset (the config file, say) does not leak into the other methods
    for m, sets in METHODS.items():
        cfg = load_config(os.path.join(root, "configs", "shapes_default.yaml"), ["credit.score_stride=2"] + sets)
        assert cfg.credit.score_stride == (2 if m == "dense_s2" else 1), m


def test_a_compare_preset_replaces_the_whole_credit_section(tmp_path):
    """A preset file's credit section is the run's whole credit section relative to CreditConfig's defaults: a config
    file that sets every credit key to something else changes nothing but credit.max_completion_batch (a memory cap,
    left to the config); overrides given to compare come after the preset and still apply. Every preset file has its
    place in the report's order, and a preset stating a key that is not a preset's is refused."""
    import dataclasses
    import os
    import yaml
    from densegrpo_fast.config import CreditConfig, load_config
    from densegrpo_fast.experiments.compare import KEPT_FROM_CONFIG, METHODS, METHODS_DIR, ORDER, load_preset
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other = {"method": "turning_point", "completion_steps": "3", "score_stride": 3, "turning_point_constraint": False,
             "turning_point_rule": "current", "turning_point_balance": False, "turning_point_balance_missing": "drop",
             "zero_gain": "zero", "branch_steps": [1], "branches": 2, "noise_aware_weights": True, "window": 2,
             "max_completion_batch": 7, "dense_target": "to_go", "dense_norm": "global", "train_from_step": 2}
    assert set(other) == {f.name for f in dataclasses.fields(CreditConfig)}  # a new credit key belongs here too
    assert all(other[k] != v for k, v in dataclasses.asdict(CreditConfig()).items())
    data = yaml.safe_load(open(os.path.join(root, "configs", "shapes_default.yaml")))
    data["model"]["path"] = os.path.join(root, data["model"]["path"])
    data["credit"] = other
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(yaml.safe_dump(data))
    files = sorted(f[:-5] for f in os.listdir(METHODS_DIR) if f.endswith(".yaml"))
    assert sorted(ORDER) == files and list(METHODS) == ORDER
    for m, sets in METHODS.items():
        stated = yaml.safe_load(open(os.path.join(METHODS_DIR, m + ".yaml")))["credit"]
        want = dataclasses.asdict(CreditConfig(**{k: str(v) if k == "completion_steps" else v
                                                  for k, v in stated.items()}))
        want.update({k: other[k] for k in KEPT_FROM_CONFIG})
        assert dataclasses.asdict(load_config(str(hostile), sets).credit) == want, m
        assert load_config(str(hostile), sets + ["credit.train_from_step=1"]).credit.train_from_step == 1
    (tmp_path / "bad.yaml").write_text("credit: {method: dense, max_completion_batch: 8}\n")
    with pytest.raises(ValueError, match="max_completion_batch"):
        load_preset(str(tmp_path / "bad.yaml"))
    (tmp_path / "bad.yaml").write_text("credit: {method: dense}\ncompare: {optinal: true}\n")
    with pytest.raises(ValueError, match="optinal"):
        load_preset(str(tmp_path / "bad.yaml"))


def test_a_method_with_one_seed_is_reported_without_an_interval():
    """A method finished on one seed only gets its value and '1 seed: no interval', never 'nan', and no verdict."""
    from densegrpo_fast.experiments.compare import write_report
    row = {"acc_before": 0.2, "gain": 0.1, "reward": 0.5, "kl": 1e-3, "epochs": 3, "s_per_epoch": 1.0,
           "rollout_s": 0.5, "reward_s": 0.0, "train_s": 0.5, "nfe_per_epoch": 1, "decodes_per_epoch": 1}
    table = {"flow_grpo": {k: [v] * 3 for k, v in row.items()} | {"acc_after": [0.30, 0.32, 0.28],
                                                                  "seed": [0, 1, 2],
                                                                  "curve": [[(0.0, 0.2), (60.0, a)] for a in
                                                                            (0.30, 0.32, 0.28)]},
             "dense_n2": {k: [v] for k, v in row.items()} | {"acc_after": [0.36], "seed": [0],
                                                                 "curve": [[(0.0, 0.2), (60.0, 0.36)]]}}
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        text = write_report(d, table, ["flow_grpo", "dense_n2"], [0, 1, 2], 60, "densegrpo compare ...")
    assert "nan" not in text.split("Training seconds")[0].split("Held-out accuracy after")[1]
    assert "| dense_n2 | 1 | 0.360 (1 seed: no interval) | +0.100 (1 seed: no interval) | — | — |" in text


@pytest.mark.slow
def test_compare_lanes_names_a_failed_run_and_exits_1(tmp_path):
    """bench/compare_lanes.sh: a run that fails is named on stderr, the other lane still runs, and the exit is 1."""
    import os
    import shutil
    import subprocess
    import sys

    import pytest
    if shutil.which("taskset") is None:
        pytest.skip("taskset not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(["bash", "bench/compare_lanes.sh", str(tmp_path), "1", "1", "nosuch:1", "nosuch2:1"],
                       cwd=root, env={**os.environ, "PY": sys.executable}, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "lane 0: nosuch seed 1 failed" in r.stderr and "lane 1: nosuch2 seed 1 failed" in r.stderr
    assert "unknown ['nosuch']" in (tmp_path / "lane0.nosuch.seed1.log").read_text()
