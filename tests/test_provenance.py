"""run_info.json (what produced a run) and archived comparisons (one metrics.jsonl.gz per comparison folder)."""
import json
import os

from conftest import ROOT


def test_run_info_records_code_packages_machine_and_command(tmp_path):
    import torch  # noqa: F401  (the record reads torch's thread count when torch is loaded, as in a run)
    from densegrpo_fast.utils.provenance import describe, write_run_info
    info = write_run_info(str(tmp_path), ["train.py", "--config", "c.yaml"])
    rec = json.loads((tmp_path / "run_info.json").read_text())
    for key in ("commit", "dirty", "python", "packages", "cpu", "cpu_count", "torch_threads", "gpu", "command",
                "start_time"):
        assert key in rec, key
    assert set(rec["packages"]) >= {"torch", "diffusers", "transformers", "deepspeed"}
    assert rec["packages"]["torch"] and rec["command"] == "train.py --config c.yaml"
    assert len(rec["commit"] or "") == 40 and isinstance(rec["dirty"], bool)  # the tests run in a git checkout
    assert rec["torch_threads"] >= 1
    # a resume keeps the first start and appends its own
    write_run_info(str(tmp_path), ["train.py", "--resume"])
    rec = json.loads((tmp_path / "run_info.json").read_text())
    assert rec["command"] == "train.py --config c.yaml" and rec["resumed"][0]["command"] == "train.py --resume"
    assert info["commit"][:7] in describe(info) and describe(None) == "no run_info.json"


def _run(d, acc):
    rows = [{"epoch": -1, "wall_s": 0.0, "eval_strict_accuracy": 0.2},
            {"epoch": 0, "wall_s": 80.0, "reward_mean": 0.5, "kl": 1e-3, "epoch_s": 80.0, "rollout_s": 40.0,
             "reward_s": 0.0, "train_s": 40.0, "nfe": 100, "decodes": 8},
            {"epoch": 0, "eval_point_s": 90.0, "wall_s": 80.0, "eval_strict_accuracy": acc, "eval_diff_base": acc - .2}]
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "config.yaml").write_text("run: {}\n")


def test_archived_comparison_reports_the_same(tmp_path):
    from densegrpo_fast.experiments.compare import ARCHIVE, archive_runs, compare_main, summarize
    from densegrpo_fast.utils.provenance import write_run_info
    for m, accs in (("flow_grpo", (0.3, 0.35, 0.4)), ("dense", (0.25, 0.3, 0.28))):
        for s, acc in enumerate(accs):
            _run(tmp_path / m / f"seed{s}", acc)
    write_run_info(str(tmp_path / "flow_grpo" / "seed0"), ["train.py"])
    before = summarize(str(tmp_path), ["flow_grpo", "dense"], [0, 1, 2], 90.0)
    assert sorted(archive_runs(str(tmp_path))) == sorted(f"{m}/seed{s}" for m in ("flow_grpo", "dense")
                                                         for s in range(3))
    assert not (tmp_path / "dense" / "seed1" / "metrics.jsonl").exists() and (tmp_path / ARCHIVE).exists()
    assert (tmp_path / "dense" / "seed1" / "config.yaml").exists()
    assert summarize(str(tmp_path), ["flow_grpo", "dense"], [0, 1, 2], 90.0) == before
    args = ["--out", str(tmp_path), "--methods", "flow_grpo,dense", "--seeds", "0,1,2", "--budget-s", "90",
            "--report-only"]
    assert compare_main(args) == 0
    md = (tmp_path / "compare.md").read_text()
    rep = json.loads((tmp_path / "compare.json").read_text())
    assert "Provenance" in md and "flow_grpo/seed0: commit" in md and "dense/seed0: no run_info.json" in md
    assert rep["provenance"]["report"]["packages"]["torch"]
    assert rep["table"]["dense"]["acc_after"] == [0.25, 0.3, 0.28]
    from densegrpo_fast.experiments.compare import unarchive_runs
    assert len(unarchive_runs(str(tmp_path))) == 6 and (tmp_path / "dense" / "seed1" / "metrics.jsonl").exists()
    assert summarize(str(tmp_path), ["flow_grpo", "dense"], [0, 1, 2], 90.0) == before


def test_docs_results_comparisons_are_archived_and_readable():
    """docs/results keeps one metrics.jsonl.gz per comparison, no raw per-run logs, and compare reads them."""
    import glob
    from densegrpo_fast.experiments.compare import summarize
    res = os.path.join(ROOT, "docs", "results")
    assert not glob.glob(os.path.join(res, "**", "metrics.jsonl"), recursive=True)
    out = os.path.join(res, "compare_shapes_v2_900s")
    stored = json.load(open(os.path.join(out, "compare.json")))["table"]
    table = summarize(out, list(stored), [0, 1, 2], 900.0)
    assert table["flow_grpo"]["acc_after"] == stored["flow_grpo"]["acc_after"]
    assert table["dense"]["epochs"] == stored["dense"]["epochs"]
