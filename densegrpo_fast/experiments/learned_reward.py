"""The learned-reward comparison's report: what was trained (the scorer on held-out prompts) and what was checked
(the shapes verifier), per method at equal training seconds and against epochs.

    python -m densegrpo_fast.experiments.learned_reward --out runs/clip_600s --methods flow_grpo,dense --seeds 0,1,2

Reads the runs of a `densegrpo compare --config configs/shapes_clip.yaml` folder (or its archive, metrics.jsonl.gz).
For each run, at every evaluation point: the scorer's mean on the test prompts (eval_reward_mean, the trained
reward), the verifier's strict accuracy and partial score. Per method over seeds: the value at the budget and the
gain over the base model (mean, sample std, 95 % t-interval); per method minus Flow-GRPO, paired by seed (same
evaluation noise), with the verdict; a reward-hacking reading (the scorer's gain resolved above 0 while the
verifier's strict accuracy or partial score is resolved below 0). Writes learned_reward.md, learned_reward.json and
learned_reward.png (the scorer and the verifier against training seconds, the scorer against epochs).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from ..stats import seed_summary, verdict
from .compare import _rows

METRICS = {"scorer": "eval_reward_mean", "verifier strict": "eval_strict_accuracy", "verifier partial": "eval_partial"}


def run_points(rows: list) -> list:
    """-> [(training seconds, epoch, {metric: value})] from the evaluation before training and every eval point."""
    out = []
    for r in rows:
        if "eval_strict_accuracy" not in r:
            continue
        if r.get("eval_point_s") is None and r.get("epoch", 0) >= 0:
            continue  # a final evaluation outside the budget's points
        s = 0.0 if r.get("eval_point_s") is None else float(r["eval_point_s"])
        out.append((s, int(r["epoch"]) + 1, {k: float(r[v]) for k, v in METRICS.items() if v in r}))
    return sorted(out, key=lambda p: p[0])


def collect(out: str, methods: list, seeds: list, budget_s: float) -> dict:
    """method -> {seed -> points up to the budget}; only runs scored at the budget. A longer run counts at a shorter
    budget with its points up to it: with the same evaluation interval, the state scored at t depends on the seed
    and the training clock only (a budget run compiles nothing, so the budget does not change what is trained)."""
    table = {}
    for m in methods:
        for s in seeds:
            pts = [p for p in run_points(_rows(os.path.join(out, m, f"seed{s}"))) if p[0] <= budget_s + 1e-6]
            if pts and abs(pts[-1][0] - budget_s) < 1e-6:
                table.setdefault(m, {})[s] = pts
    return table


def summarize(table: dict, baseline: str = "flow_grpo") -> dict:
    res = {"methods": {}, "vs_baseline": {}}
    for m, runs in table.items():
        row = {"seeds": sorted(runs), "epochs": seed_summary([runs[s][-1][1] for s in sorted(runs)])}
        for k in METRICS:
            final = [runs[s][-1][2][k] for s in sorted(runs)]
            gain = [runs[s][-1][2][k] - runs[s][0][2][k] for s in sorted(runs)]
            g = seed_summary(gain)
            row[k] = {"final": seed_summary(final), "gain": {**g, "verdict": verdict(*g["ci"]) if g["n"] > 1
                                                              else "1 seed"}}
        # reward hacking: the scorer's gain resolved above 0 while a verifier figure's is resolved below 0
        sg = row["scorer"]["gain"]
        up = sg["n"] > 1 and sg["ci"][0] > 0
        row["hacked"] = [k for k in ("verifier strict", "verifier partial") if up and row[k]["gain"]["ci"][1] < 0]
        row["reward_hacking"] = bool(row["hacked"])
        res["methods"][m] = row
    if baseline in table:
        res["baseline_rise"] = rise_to_budget(table[baseline])
        for m in table:
            if m == baseline:
                continue
            shared = sorted(set(table[m]) & set(table[baseline]))
            if len(shared) < 2:
                continue
            d = {}
            for k in METRICS:
                diffs = [table[m][s][-1][2][k] - table[baseline][s][-1][2][k] for s in shared]
                ss = seed_summary(diffs)
                d[k] = {**ss, "diffs": diffs, "verdict": verdict(*ss["ci"])}
            res["vs_baseline"][m] = d
    return res


def rise_to_budget(runs: dict) -> list:
    """Has the curve flattened? For each evaluation point before the budget: the per-seed rise of each metric from
    that point to the budget (paired by seed), mean, sample std, 95 % t-interval and verdict. runs: {seed: points},
    every seed evaluated at the same training seconds. -> [{"s", "epoch", metric: summary}]."""
    seeds = sorted(runs)
    n_pts = min(len(runs[s]) for s in seeds)
    out = []
    for i in range(n_pts - 1):
        row = {"s": runs[seeds[0]][i][0], "epoch": float(np.mean([runs[s][i][1] for s in seeds]))}
        for k in METRICS:
            ss = seed_summary([runs[s][-1][2][k] - runs[s][i][2][k] for s in seeds])
            row[k] = {**ss, "verdict": verdict(*ss["ci"]) if ss["n"] > 1 else "1 seed"}
        out.append(row)
    return out


def _ci(s: dict, spec: str = "+.4f") -> str:
    if s["n"] < 2:
        return f"{s['mean']:{spec}} (1 seed)"
    return f"{s['mean']:{spec}} ± {s['std']:.4f} ({s['ci'][0]:{spec}}, {s['ci'][1]:{spec}})"


def write_report(out: str, table: dict, res: dict, budget_s: float, cmdline: str) -> str:
    lines = [f"# Learned reward: equal training seconds ({budget_s:.0f} s)", "",
             f"Command: `{cmdline}`", "",
             "Values at the budget; gain = value at the budget minus the same run's evaluation before training "
             "(paired by image); mean ± sample std (ddof = 1) and 95 % t-interval over seeds.", "",
             "| method | seeds | epochs | scorer at budget | scorer gain | verifier strict gain | verifier partial gain "
             "| reward hacking |", "|---|---|---|---|---|---|---|---|"]
    for m, row in res["methods"].items():
        lines.append(f"| {m} | {len(row['seeds'])} | {row['epochs']['mean']:.1f} | "
                     f"{_ci(row['scorer']['final'], '.4f')} | {_ci(row['scorer']['gain'])} "
                     f"{row['scorer']['gain']['verdict']} | {_ci(row['verifier strict']['gain'])} "
                     f"{row['verifier strict']['gain']['verdict']} | {_ci(row['verifier partial']['gain'])} | "
                     f"{'yes (' + ', '.join(row['hacked']) + ')' if row['reward_hacking'] else 'no'} |")
    if res["vs_baseline"]:
        lines += ["", "Minus Flow-GRPO, paired by seed:", "",
                  "| method | scorer | verdict | verifier strict | verdict |", "|---|---|---|---|---|"]
        for m, d in res["vs_baseline"].items():
            lines.append(f"| {m} | {_ci(d['scorer'])} | {d['scorer']['verdict']} | {_ci(d['verifier strict'])} | "
                         f"{d['verifier strict']['verdict']} |")
    if res.get("baseline_rise"):
        lines += ["", "Has Flow-GRPO flattened? Its rise from each evaluation point to the budget, paired by seed (a "
                  "rise resolved above 0 from the last point before the budget means it has not):", "",
                  "| from (training s) | epoch | scorer rise | verdict | verifier strict rise | verdict |",
                  "|---|---|---|---|---|---|"]
        for r in res["baseline_rise"]:
            lines.append(f"| {r['s']:.0f} | {r['epoch']:.1f} | {_ci(r['scorer'])} | {r['scorer']['verdict']} | "
                         f"{_ci(r['verifier strict'])} | {r['verifier strict']['verdict']} |")
    lines += ["", "Curves (mean over seeds at each evaluation point: training seconds, epochs reached, scorer, "
              "verifier strict):", ""]
    for m, runs in table.items():
        seeds = sorted(runs)
        n_pts = min(len(runs[s]) for s in seeds)
        for i in range(n_pts):
            sec = runs[seeds[0]][i][0]
            ep = np.mean([runs[s][i][1] for s in seeds])
            sc = np.mean([runs[s][i][2]["scorer"] for s in seeds])
            vf = np.mean([runs[s][i][2]["verifier strict"] for s in seeds])
            lines.append(f"- {m} @ {sec:.0f} s: epoch {ep:.1f}, scorer {sc:.4f}, verifier {vf:.3f}")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "learned_reward.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "learned_reward.json"), "w") as f:
        json.dump({"budget_s": budget_s, "command": cmdline, **res,
                   "points": {m: {str(s): p for s, p in runs.items()} for m, runs in table.items()}}, f, indent=1)
    return text


def plot(out: str, table: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for c, (m, runs) in enumerate(table.items()):
        color = f"C{c}"
        seeds = sorted(runs)
        n_pts = min(len(runs[s]) for s in seeds)
        x = [runs[seeds[0]][i][0] for i in range(n_pts)]
        for j, k in enumerate(["scorer", "verifier strict"]):
            y = np.array([[runs[s][i][2][k] for i in range(n_pts)] for s in seeds])
            ax[j].plot(x, y.mean(0), "o-", label=m, color=color)
            if len(seeds) > 1:
                ax[j].fill_between(x, y.min(0), y.max(0), alpha=0.15, color=color)
        for s in seeds:
            ax[2].plot([p[1] for p in runs[s]], [p[2]["scorer"] for p in runs[s]], "o-", alpha=0.6,
                       color=color, label=m if s == seeds[0] else None)
    ax[0].set(xlabel="training seconds", ylabel="scorer (test prompts)", title="trained reward")
    ax[1].set(xlabel="training seconds", ylabel="verifier strict accuracy", title="held-out verifier")
    ax[2].set(xlabel="epochs", ylabel="scorer (test prompts)", title="against epochs (each seed)")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "learned_reward.png"), dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="a compare folder (runs or metrics.jsonl.gz)")
    p.add_argument("--methods", default="flow_grpo,dense")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget-s", type=float, required=True)
    a = p.parse_args(argv)
    methods, seeds = a.methods.split(","), [int(s) for s in a.seeds.split(",")]
    table = collect(a.out, methods, seeds, a.budget_s)
    if not table:
        raise SystemExit(f"{a.out}: no finished run at {a.budget_s:.0f} s for {methods} x seeds {seeds}")
    res = summarize(table)
    cmd = "python -m densegrpo_fast.experiments.learned_reward " + " ".join(argv or [])
    print(write_report(a.out, table, res, a.budget_s, cmd))
    plot(a.out, table)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
