"""The learned-reward report on hand-made runs: values at the budget, gains over the base, paired differences to
Flow-GRPO with their verdicts, and the reward-hacking reading (scorer up, verifier down, both resolved)."""
import json
import os

import pytest

from densegrpo_fast.experiments.learned_reward import collect, summarize, write_report


def _run(folder, points):
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for epoch, s, sc, vf in points:
            row = {"epoch": epoch, "eval_reward_mean": sc, "eval_strict_accuracy": vf, "eval_partial": vf + 0.1}
            if s is not None:
                row["eval_point_s"] = s
            f.write(json.dumps(row) + "\n")
            if epoch >= 0:
                f.write(json.dumps({"epoch": epoch, "loss": 0.0}) + "\n")


def test_report_on_hand_made_runs(tmp_path):
    out = str(tmp_path)
    for s, (d_sc, d_vf) in enumerate([(0.010, -0.030), (0.012, -0.020), (0.011, -0.025)]):
        _run(os.path.join(out, "flow_grpo", f"seed{s}"), [(-1, None, 0.40, 0.30), (9, 100.0, 0.40 + d_sc, 0.30 + d_vf)])
        _run(os.path.join(out, "dense", f"seed{s}"), [(-1, None, 0.40, 0.30), (3, 100.0, 0.42 + s * 1e-3, 0.31)])
    _run(os.path.join(out, "dense", "seed9"), [(-1, None, 0.40, 0.30), (2, 50.0, 0.5, 0.3)])  # another budget
    table = collect(out, ["flow_grpo", "dense"], [0, 1, 2, 9], 100.0)
    assert sorted(table["dense"]) == [0, 1, 2]   # the run last scored at 50 s is left out
    res = summarize(table)
    fg = res["methods"]["flow_grpo"]
    assert fg["epochs"]["mean"] == pytest.approx(10.0)
    assert fg["scorer"]["gain"]["mean"] == pytest.approx(0.011)
    assert fg["scorer"]["gain"]["verdict"] == "resolved better"
    assert fg["verifier strict"]["gain"]["verdict"] == "resolved worse"
    assert fg["reward_hacking"] and not res["methods"]["dense"]["reward_hacking"]
    assert fg["hacked"] == ["verifier strict", "verifier partial"]   # partial = strict + 0.1 here: both fall
    d = res["vs_baseline"]["dense"]
    assert d["scorer"]["diffs"] == pytest.approx([0.010, 0.009, 0.011])
    assert d["scorer"]["verdict"] == "resolved better"
    assert d["verifier strict"]["mean"] == pytest.approx(0.035)
    rise = res["baseline_rise"]                  # one point before the budget: the evaluation before training
    assert [r["s"] for r in rise] == [0.0] and rise[0]["epoch"] == 0.0
    assert rise[0]["scorer"]["mean"] == pytest.approx(0.011) and rise[0]["scorer"]["verdict"] == "resolved better"
    text = write_report(out, table, res, 100.0, "cmd")
    assert "| flow_grpo | 3 | 10.0 |" in text and "yes (verifier strict, verifier partial)" in text
    assert "| 0 | 0.0 | +0.0110 ± 0.0010 (+0.0085, +0.0135) | resolved better |" in text
    assert os.path.isfile(os.path.join(out, "learned_reward.json"))


def test_flow_grpo_flattened_reading(tmp_path):
    """The baseline's rise to the budget from each evaluation point: resolved above 0 while it still climbs, not
    resolved once it has flattened (here from 200 s on: the seeds move by +-0.001 after it)."""
    out = str(tmp_path)
    for s, wob in enumerate([0.001, -0.001, 0.0005]):
        _run(os.path.join(out, "flow_grpo", f"seed{s}"),
             [(-1, None, 0.40, 0.30), (9, 100.0, 0.42 + s * 1e-3, 0.30), (19, 200.0, 0.45 + s * 1e-3, 0.30),
              (29, 300.0, 0.45 + s * 1e-3 + wob, 0.30)])
    rise = summarize(collect(out, ["flow_grpo"], [0, 1, 2], 300.0))["baseline_rise"]
    assert [r["s"] for r in rise] == [0.0, 100.0, 200.0] and [r["epoch"] for r in rise] == [0.0, 10.0, 20.0]
    assert [r["scorer"]["verdict"] for r in rise] == ["resolved better", "resolved better", "not resolved"]
    assert rise[2]["scorer"]["mean"] == pytest.approx(0.0005 / 3)


def test_a_longer_run_counts_at_a_shorter_budget(tmp_path):
    """A run to 300 s with points every 100 s is read at a 200 s budget as its points up to 200 s; one scored at 150 s
    but not at 200 s is left out."""
    out = str(tmp_path)
    _run(os.path.join(out, "flow_grpo", "seed0"),
         [(-1, None, 0.40, 0.30), (9, 100.0, 0.41, 0.30), (19, 200.0, 0.43, 0.31), (29, 300.0, 0.90, 0.90)])
    _run(os.path.join(out, "flow_grpo", "seed1"), [(-1, None, 0.40, 0.30), (14, 150.0, 0.44, 0.30)])
    table = collect(out, ["flow_grpo"], [0, 1], 200.0)
    assert sorted(table["flow_grpo"]) == [0]
    pts = table["flow_grpo"][0]
    assert [p[0] for p in pts] == [0.0, 100.0, 200.0] and pts[-1][2]["scorer"] == pytest.approx(0.43)
    assert collect(out, ["flow_grpo"], [0], 300.0)["flow_grpo"][0][-1][2]["scorer"] == pytest.approx(0.90)


def test_reward_hacking_on_the_partial_score_alone(tmp_path):
    """The scorer up (resolved) while only the verifier's partial score falls (resolved) and strict does not move:
    reward hacking, named on the partial score."""
    out = str(tmp_path)
    for s, (d_sc, d_part, d_strict) in enumerate([(0.010, -0.030, 0.01), (0.012, -0.020, -0.02), (0.011, -0.025, 0.0)]):
        folder = os.path.join(out, "dense", f"seed{s}")
        os.makedirs(folder)
        with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
            for epoch, pt, sc, st, part in [(-1, None, 0.4, 0.3, 0.5), (5, 100.0, 0.4 + d_sc, 0.3 + d_strict,
                                                                         0.5 + d_part)]:
                row = {"epoch": epoch, "eval_reward_mean": sc, "eval_strict_accuracy": st, "eval_partial": part}
                f.write(json.dumps(row if pt is None else {**row, "eval_point_s": pt}) + "\n")
    row = summarize(collect(out, ["dense"], [0, 1, 2], 100.0))["methods"]["dense"]
    assert row["verifier strict"]["gain"]["verdict"] == "not resolved"
    assert row["reward_hacking"] and row["hacked"] == ["verifier partial"]
