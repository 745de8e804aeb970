"""`densegrpo compare`: chosen methods on the same task, the same seeds, the same wall-clock budget.

Each (method, seed) is a normal training run (`train.py`, so DeepSpeed and checkpoints as usual) with
run.wall_clock_budget_s set; held-out evaluation at every `--eval-every-s` training seconds and at the budget scores
the last state whose training clock is <= that point (evaluation time is excluded from the clock), so every method
is compared with at most the same training seconds. Writes
compare.json, compare.md (the table) and compare.png (held-out accuracy and KL against wall-clock). Finished runs are
kept: calling the command again skips them, so an interrupted comparison resumes.

Methods are the preset files `densegrpo_fast/experiments/methods/<method>.yaml`, each a partial config:

- its `credit` section REPLACES the run's whole credit section, relative to the defaults of config.py's
  CreditConfig: every credit key the preset does not state takes its default, whatever the config file (or an
  earlier override) says, so nothing of another method leaks in. Applied as one `credit.KEY=VALUE` override per
  credit key. The one exception is `credit.max_completion_batch`, a memory cap on how completions are chunked (not
  what they compute): it stays the config's.
- any other config section states only the keys it changes (`section.key=value` overrides);
- an optional `compare:` section is this command's own: `optional: true` (run only when --methods names it),
  `calibrate: true` (run `densegrpo calibrate` once per comparison and use its noise_schedule.json).

The run's command line is the fixed run settings, then the preset's overrides, then compare's own (the base-evaluation
cache, this command's `--set`s, the calibrated schedule), so `--set credit.KEY=V` still changes every method.
A new method is a new file (and its row position in ORDER).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Optional

import numpy as np
import yaml

from ..config import CreditConfig
from ..utils.provenance import describe

METHODS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "methods")
# the report's row order and the default --methods order; a preset file not named here follows, alphabetically
ORDER = ["flow_grpo", "dense", "dense_n1", "dense_n2", "dense_s2", "dense_cal", "tp_grpo", "dense_zero", "tempflow",
         "tempflow_plain", "flow_grpo_fast"]
KEPT_FROM_CONFIG = ("max_completion_batch",)  # credit keys a preset leaves to the config (see the docstring)


def _value(v) -> str:
    """A value as the text of a `--set` override that config.parse_override reads back as the same value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str) and yaml.safe_load(v) == v:
        return v
    return json.dumps(v, separators=(",", ":"))  # JSON is YAML: lists, numbers, strings YAML reads otherwise


def load_preset(path: str) -> dict:
    """A method preset file -> {"overrides": [section.key=value, ...], "compare": {...}} (see the docstring)."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    name = os.path.splitext(os.path.basename(path))[0]
    if not isinstance(data, dict) or not isinstance(data.get("credit"), dict):
        raise ValueError(f"{path}: a method preset states its credit section (credit: {{method: ...}})")
    opts = dict(data.pop("compare", None) or {})
    unknown = set(opts) - {"optional", "calibrate"}
    if unknown:
        raise ValueError(f"{path}: unknown compare keys {sorted(unknown)}; allowed: optional, calibrate")
    names = [f.name for f in dataclasses.fields(CreditConfig)]
    bad = [k for k in data["credit"] if k not in names or k in KEPT_FROM_CONFIG]
    if bad:
        raise ValueError(f"{path}: credit keys {bad} are not a preset's (allowed: "
                         f"{', '.join(n for n in names if n not in KEPT_FROM_CONFIG)})")
    credit = {**dataclasses.asdict(CreditConfig()), **data.pop("credit")}
    sets = [f"credit.{k}={_value(v)}" for k, v in credit.items() if k not in KEPT_FROM_CONFIG]
    for section, keys in data.items():
        if not isinstance(keys, dict):
            raise ValueError(f"{path}: '{section}' is not a section of keys")
        sets += [f"{section}.{k}={_value(v)}" for k, v in keys.items()]
    return {"name": name, "overrides": sets, "compare": opts}


def load_presets(folder: str = METHODS_DIR) -> dict:
    """Every preset of `folder`, in ORDER (then the others alphabetically): name -> load_preset()."""
    names = sorted(os.path.splitext(f)[0] for f in os.listdir(folder) if f.endswith(".yaml"))
    names = [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]
    return {n: load_preset(os.path.join(folder, n + ".yaml")) for n in names}


PRESETS = load_presets()
METHODS = {m: p["overrides"] for m, p in PRESETS.items()}  # method -> its train.py --set overrides
OPTIONAL = [m for m, p in PRESETS.items() if p["compare"].get("optional")]  # run on request (--methods ...)
# paired ablations reported whenever both ran: (method, its reference); each differs from it in one setting
ABLATIONS = [("tempflow", "tempflow_plain"), ("dense_n1", "dense"), ("dense_n2", "dense"), ("dense_s2", "dense"),
             ("dense_cal", "dense"), ("dense_zero", "dense")]


ARCHIVE = "metrics.jsonl.gz"  # an archived comparison: every run's metrics in one file, each row tagged "run"


def _rows(run_dir: str) -> list[dict]:
    """A run's metrics.jsonl rows; for an archived run (docs/results/), its rows of <comparison>/metrics.jsonl.gz."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    run_dir = os.path.normpath(run_dir)
    seed, method = os.path.basename(run_dir), os.path.basename(os.path.dirname(run_dir))
    archive = os.path.join(os.path.dirname(os.path.dirname(run_dir)), ARCHIVE)
    if not os.path.exists(archive):
        return []
    return [r for r in read_archive(archive) if r.pop("run", None) == f"{method}/{seed}"]


def unarchive_runs(out: str) -> list[str]:
    """The inverse of archive_runs: write each archived run's rows back to <out>/<run>/metrics.jsonl (to continue
    or extend an archived comparison in a copy of its folder). -> the runs written."""
    path = os.path.join(out, ARCHIVE)
    runs: dict = {}
    for r in read_archive(path) if os.path.exists(path) else []:
        runs.setdefault(r.pop("run"), []).append(r)
    for name, rows in runs.items():
        os.makedirs(os.path.join(out, name), exist_ok=True)
        with open(os.path.join(out, name, "metrics.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return sorted(runs)


def read_archive(path: str) -> list[dict]:
    import gzip
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def archive_runs(out: str) -> list[str]:
    """Move every <out>/<method>/seed<N>/metrics.jsonl into one <out>/metrics.jsonl.gz (rows tagged
    "run": "<method>/seed<N>"); config.yaml, eval_before_after.json and run_info.json stay. -> the runs archived."""
    import glob
    import gzip
    paths = sorted(glob.glob(os.path.join(out, "*", "seed*", "metrics.jsonl")))
    rows = read_archive(os.path.join(out, ARCHIVE)) if os.path.exists(os.path.join(out, ARCHIVE)) else []
    names = [os.path.relpath(os.path.dirname(p), out) for p in paths]
    rows = [r for r in rows if r.get("run") not in names]
    for name, p in zip(names, paths):
        with open(p) as f:
            rows += [{"run": name, **json.loads(line)} for line in f if line.strip()]
    with gzip.GzipFile(os.path.join(out, ARCHIVE), "wb", mtime=0) as f:  # mtime 0: the same bytes every time
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    for p in paths:
        os.remove(p)
    return names


def calibrated_schedule(config: str, out: str, overrides: list[str], launcher_python: str) -> str:
    """`densegrpo calibrate` once per comparison (kept: a resumed comparison reuses it) -> noise_schedule.json."""
    path = os.path.join(out, "calibration", "noise_schedule.json")
    if not os.path.exists(path):
        cmd = [launcher_python, "-m", "densegrpo_fast.cli", "calibrate", "--config", config, "--out",
               os.path.dirname(path), "--set", "credit.method=dense"]
        for o in overrides:
            cmd += ["--set", o]
        print(f"[compare] calibration: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
    return path


def finished(run_dir: str, budget_s: Optional[float] = None) -> bool:
    """A run counts once it has written its final LoRA weights (a stopped run resumes; it is not summarised), or,
    given the budget, once its metrics.jsonl holds the evaluation at the budget's point: an archived run (e.g. a copy
    in docs/results/, metrics without weights) is reported and never re-run."""
    if os.path.exists(os.path.join(run_dir, "lora", "pytorch_lora_weights.safetensors")):
        return True
    return budget_s is not None and _last_point(_rows(run_dir)) == budget_s


def _last_point(rows: list[dict]) -> Optional[float]:
    """The last training-seconds point a run was scored at (None: never scored at fixed seconds)."""
    pts = [r["eval_point_s"] for r in rows if "eval_point_s" in r and "eval_strict_accuracy" in r]
    return max(pts) if pts else None


def run_one(config: str, method: str, seed: int, budget_s: float, run_dir: str, eval_every_s: float,
            overrides: list[str], launcher: list[str]) -> None:
    if finished(run_dir, budget_s):
        print(f"[compare] {method} seed {seed}: done already ({run_dir})", flush=True)
        return
    sets = [f"run.seed={seed}", f"run.wall_clock_budget_s={budget_s}", "run.epochs=100000", "run.progress=false",
            "eval.enabled=true", "run.eval_every=0", f"run.eval_every_s={eval_every_s}", "run.save_every=5"] + \
        METHODS[method] + overrides
    cmd = launcher + ["train.py", "--config", config, "--run-dir", run_dir]
    for s in sets:
        cmd += ["--set", s]
    if os.path.exists(os.path.join(run_dir, "checkpoints", "latest")):
        cmd.append("--resume")
    print(f"[compare] {method} seed {seed}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def summarize(out: str, methods: list[str], seeds: list[int], budget_s: Optional[float] = None) -> dict:
    table = {}
    for m in methods:
        per_seed = []
        for s in seeds:
            if not finished(os.path.join(out, m, f"seed{s}"), budget_s):
                continue
            rows = _rows(os.path.join(out, m, f"seed{s}"))
            end = _last_point(rows)
            if budget_s is not None and end is not None and end != budget_s:
                # its "after" would be another budget's score: left out, and said so
                print(f"[compare] {m}/seed{s}: scored up to {end:g} s, not at the {budget_s:g} s budget: left out",
                      flush=True)
                continue
            train = [r for r in rows if r["epoch"] >= 0 and "eval_point_s" not in r]
            evals = [r for r in rows if "eval_strict_accuracy" in r and "eval_point_s" not in r]
            points = [r for r in rows if "eval_point_s" in r and "eval_strict_accuracy" in r]
            if points:  # scored at fixed training seconds: "after" is the score at the last point (the budget)
                evals = evals[:1] + [max(points, key=lambda r: r["eval_point_s"])]
            if not train:
                continue
            last = train[-3:]
            per_seed.append({
                "seed": s,
                # the accuracy curve at fixed training seconds (the base model at 0 s)
                "curve": ([(0.0, evals[0]["eval_strict_accuracy"])] if evals and evals[0]["epoch"] < 0 else []) +
                         [(r["eval_point_s"], r["eval_strict_accuracy"]) for r in points],
                "acc_before": evals[0]["eval_strict_accuracy"] if evals and evals[0]["epoch"] < 0 else float("nan"),
                "acc_after": evals[-1]["eval_strict_accuracy"] if evals else float("nan"),
                # paired to the same run's evaluation before training (same images' noise), bootstrap CI over prompts
                "gain": evals[-1].get("eval_diff_base", float("nan")) if evals else float("nan"),
                "reward": float(np.mean([r["reward_mean"] for r in last])),
                "kl": float(np.mean([r["kl"] for r in last])),
                "epochs": len(train), "wall_s": train[-1]["wall_s"],
                "s_per_epoch": float(np.mean([r["epoch_s"] for r in train])),
                "rollout_s": float(np.mean([r["rollout_s"] for r in train])),
                "reward_s": float(np.mean([r["reward_s"] for r in train])),
                "train_s": float(np.mean([r["train_s"] for r in train])),
                "nfe_per_epoch": float(np.mean([r["nfe"] + r.get("train_nfe", 0) for r in train])),
                "rollout_nfe_per_epoch": float(np.mean([r["nfe"] for r in train])),
                "decodes_per_epoch": float(np.mean([r["decodes"] for r in train])),
            })
        if per_seed:
            table[m] = {k: [d[k] for d in per_seed] for k in per_seed[0]}
    return table


def time_to_quality(table: dict, baseline: str = "flow_grpo") -> dict:
    """Training seconds each run needs to reach the baseline's final accuracy (mean over its seeds): the first
    evaluation point at or above it (inf: never within the budget). -> {"target": a, method: [seconds per seed]}."""
    if baseline not in table:
        return {}
    target = float(np.mean(table[baseline]["acc_after"]))
    out: dict = {"target": target}
    for m, cols in table.items():
        out[m] = [next((t for t, a in curve if a >= target), float("inf")) for curve in cols["curve"]]
    return out


def curve_to_budget(table: dict, method: str = "flow_grpo") -> list[dict]:
    """Has a method's curve flattened? At every evaluation point t all its seeds share: the mean accuracy over seeds
    (95 % t-interval) and the paired per-seed change from t to the last point (the budget), acc(T) - acc(t), with its
    t-interval and verdict ("resolved better" = still rising after t). -> [{"t", "acc", "rise"}] by t."""
    from ..stats import seed_summary, verdict
    if method not in table:
        return []
    curves = [dict(c) for c in table[method]["curve"]]
    if len(curves) < 2 or not all(curves):
        return []
    shared = sorted(set.intersection(*(set(c) for c in curves)))
    if not shared:
        return []
    end = shared[-1]
    out = []
    for t in shared:
        rise = seed_summary([c[end] - c[t] for c in curves]) if t < end else None
        out.append({"t": t, "acc": seed_summary([c[t] for c in curves]),
                    "rise": {**rise, "verdict": verdict(*rise["ci"])} if rise else None})
    return out


def _fmt(v: list) -> str:
    """mean ± sample std (ddof = 1) over seeds."""
    a = np.array(v, dtype=float)
    if len(a) == 1:
        return f"{a[0]:.3g}"
    return f"{a.mean():.3g} ± {a.std(ddof=1):.2g}"


def _mean_ci(s: dict, spec: str) -> str:
    """'mean (lo, hi)' of a seed_summary; one seed has no interval over seeds, and says so instead of 'nan'."""
    if not np.isfinite(s["mean"]):
        return "—"
    if not np.all(np.isfinite(s["ci"])):
        return f"{s['mean']:{spec}} (1 seed: no interval)"
    return f"{s['mean']:{spec}} ({s['ci'][0]:{spec}}, {s['ci'][1]:{spec}})"


def paired_diff(table: dict, a: str, b: str, key: str = "acc_after") -> Optional[dict]:
    """a minus b per seed (the runs of one seed share the evaluation noise: paired): the per-seed differences, mean,
    sample std, 95 % t-interval over seeds and the verdict; None with fewer than two shared seeds."""
    from ..stats import seed_summary, verdict
    if a not in table or b not in table:
        return None
    base = dict(zip(table[b]["seed"], table[b][key]))
    diffs = [v - base[s] for s, v in zip(table[a]["seed"], table[a][key]) if s in base]
    if len(diffs) < 2:
        return None
    s = seed_summary(diffs)
    return {**s, "diffs": diffs, "verdict": verdict(*s["ci"])}


def paired_verdicts(table: dict, baseline: str = "flow_grpo", key: str = "acc_after") -> dict:
    """For every method, paired_diff to the baseline."""
    out = {m: paired_diff(table, m, baseline, key) for m in table if m != baseline}
    return {m: d for m, d in out.items() if d is not None}


def ablations(table: dict) -> dict:
    """paired_diff of every ABLATIONS pair that ran: "a - b" -> summary."""
    out = {f"{a} - {b}": paired_diff(table, a, b) for a, b in ABLATIONS}
    return {k: d for k, d in out.items() if d is not None}


def _verdicts(table: dict) -> dict:
    """Every verdict a report states: "m - flow_grpo", "m - base" (the gain over the base model) and the ablation
    pairs -> {mean, ci, verdict}."""
    from ..stats import seed_summary, verdict
    out = {f"{m} - flow_grpo": d for m, d in paired_verdicts(table).items()}
    for m, cols in table.items():
        g = seed_summary(cols["gain"])
        if g["n"] > 1 and np.all(np.isfinite(cols["gain"])):
            out[f"{m} - base"] = {**g, "verdict": verdict(*g["ci"])}
    out.update(ablations(table))
    return out


def replication(old: dict, new: dict) -> dict:
    """A comparison with new seeds against an earlier one: for every verdict both state, whether it reproduces.
    old/new: _verdicts() of each. A resolved verdict is "reproduced" (resolved again, same sign), "sign kept" (same
    sign, not resolved now) or "reversed"; a not-resolved one is "consistent" while it stays so, else "newly
    resolved". -> {key: {"old": verdict, "new": verdict, "new_mean", "new_ci", "outcome"}}."""
    out = {}
    for k in old:
        if k not in new:
            continue
        o, n = old[k], new[k]
        if o["verdict"] == "not resolved":
            outcome = "consistent" if n["verdict"] == "not resolved" else "newly resolved"
        elif n["verdict"] == o["verdict"]:
            outcome = "reproduced"
        elif np.sign(n["mean"]) == np.sign(o["mean"]):
            outcome = "sign kept"
        else:
            outcome = "reversed"
        out[k] = {"old": o["verdict"], "old_mean": o["mean"], "new": n["verdict"], "new_mean": n["mean"],
                  "new_ci": list(n["ci"]), "outcome": outcome}
    return out


def speed_check(table: dict, earlier: Optional[dict] = None, tol: float = 0.25) -> list[str]:
    """Warnings where wall-clock matching breaks: a method whose seconds per epoch differ across its seeds by more
    than `tol` (max / min - 1), or, against an earlier comparison's table, a method whose mean s / epoch changed by
    more than `tol` (another machine or a loaded one: the same training seconds are then another number of epochs)."""
    out = []
    for m, t in table.items():
        v = [x for x in t.get("s_per_epoch", []) if np.isfinite(x) and x > 0]
        if len(v) > 1 and max(v) / min(v) - 1 > tol:
            out.append(f"{m}: s / epoch {min(v):.1f} to {max(v):.1f} across seeds (> {tol:.0%} apart): its runs did "
                       f"not run at one speed")
        old = [x for x in ((earlier or {}).get(m) or {}).get("s_per_epoch", []) if np.isfinite(x) and x > 0]
        if v and old and abs(np.mean(v) / np.mean(old) - 1) > tol:
            out.append(f"{m}: s / epoch {np.mean(v):.1f} here against {np.mean(old):.1f} in the earlier comparison "
                       f"(x{np.mean(v) / np.mean(old):.2f}): the same seconds are another number of epochs")
    return out


def write_report(out: str, table: dict, methods: list[str], seeds: list[int], budget_s: float, cmdline: str,
                 replicate_of: Optional[str] = None) -> str:
    from ..stats import seed_summary
    cols = ["acc_before", "acc_after", "gain", "reward", "kl", "epochs", "s_per_epoch", "rollout_s", "reward_s",
            "train_s",
            "nfe_per_epoch", "decodes_per_epoch"]
    lines = [f"Wall-clock budget {budget_s:.0f} s per run (training only; evaluation excluded), seeds {seeds}.",
             f"Command: `{cmdline}`", "",
             "| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for m in methods:
        if m in table:
            lines.append(f"| {m} | " + " | ".join(_fmt(table[m][c]) for c in cols) + " |")
    if "acc_after" in cols:
        lines += ["", "Held-out accuracy after training: mean, sample std (ddof = 1), 95 % t-interval over seeds; "
                      "and the paired difference to Flow-GRPO (same seed, same evaluation noise):", "",
                  "| method | seeds | acc. after (95 % CI) | gain over base (95 % CI) | minus Flow-GRPO (95 % CI) | "
                  "verdict |", "|---|---|---|---|---|---|"]
        pv = paired_verdicts(table)
        for m in methods:
            if m not in table:
                continue
            s = seed_summary(table[m]["acc_after"])
            g = seed_summary(table[m]["gain"])
            d = pv.get(m)
            lines.append(f"| {m} | {s['n']} | {_mean_ci(s, '.3f')} | {_mean_ci(g, '+.3f')} | "
                         f"{_mean_ci(d, '+.3f') if d else '—'} | {d['verdict'] if d else '—'} |")
    ttq = time_to_quality(table)
    if ttq:
        lines += ["", f"Training seconds to reach Flow-GRPO's final accuracy ({ttq['target']:.3f}, its mean over "
                      f"seeds): the first evaluation point at or above it, per seed; mean and 95 % t-interval over "
                      f"seeds where every seed reached it:", "", "| method | seconds per seed | mean (95 % CI) |",
                  "|---|---|---|"]
        for m in methods:
            if m not in ttq:
                continue
            v = ttq[m]
            per = ", ".join("never" if not np.isfinite(x) else f"{x:.0f}" for x in v)
            if all(np.isfinite(v)) and len(v) > 1:
                ss = seed_summary(v)
                agg = f"{ss['mean']:.0f} ({ss['ci'][0]:.0f}, {ss['ci'][1]:.0f})"
            else:
                agg = f"not reached by {sum(not np.isfinite(x) for x in v)} of {len(v)} seeds" \
                    if not all(np.isfinite(v)) else "—"
            lines.append(f"| {m} | {per} | {agg} |")
    flat = curve_to_budget(table)
    if flat:
        lines += ["", "Flow-GRPO's curve to the budget (has it flattened?): mean accuracy over seeds at each evaluation "
                      "point, and the paired per-seed rise from that point to the budget (95 % t-intervals):", "",
                  "| training s | acc. (95 % CI) | rise to the budget (95 % CI) | verdict |", "|---|---|---|---|"]
        for r in flat:
            a, d = r["acc"], r["rise"]
            rise = f"{d['mean']:+.3f} ({d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}) | {d['verdict']}" if d else "— | —"
            lines.append(f"| {r['t']:.0f} | {a['mean']:.3f} ({a['ci'][0]:.3f}, {a['ci'][1]:.3f}) | {rise} |")
    abl = ablations(table)
    if abl:
        lines += ["", "Ablations: the paired per-seed difference of each method to the one it changes in a single "
                      "setting (95 % t-interval over seeds):", "", "| method − reference | seeds | difference (95 % CI) "
                      "| verdict |", "|---|---|---|---|"]
        for k, d in abl.items():
            lines.append(f"| {k.replace(' - ', ' − ')} | {d['n']} | {d['mean']:+.3f} ({d['ci'][0]:+.3f}, "
                         f"{d['ci'][1]:+.3f}) | {d['verdict']} |")
    if "flow_grpo" in table and "dense" in table:
        t = np.mean(table["dense"]["s_per_epoch"]) / np.mean(table["flow_grpo"]["s_per_epoch"])
        f = np.mean(table["dense"]["nfe_per_epoch"]) / np.mean(table["flow_grpo"]["nfe_per_epoch"])
        r = np.mean(table["dense"]["rollout_nfe_per_epoch"]) / np.mean(table["flow_grpo"]["rollout_nfe_per_epoch"])
        lines += ["", f"DenseGRPO / Flow-GRPO: epoch time x{t:.2f}; network evaluations x{f:.2f} "
                      f"(rollout alone x{r:.2f}), same settings, same run."]
    rep, earlier = {}, {}
    if replicate_of:  # the earlier comparison's compare.json: does this one (new seeds) reproduce its verdicts?
        with open(replicate_of) as fh:
            earlier = json.load(fh)
        rep = replication(earlier.get("verdicts") or _verdicts(earlier["table"]), _verdicts(table))
        lines += ["", f"Replication of `{replicate_of}` (its verdicts against this run's, same settings, other seeds):",
                  "", "| comparison | earlier mean | earlier verdict | now (95 % CI) | now | outcome |",
                  "|---|---|---|---|---|---|"]
        for k, r in rep.items():
            lines.append(f"| {k.replace(' - ', ' − ')} | {r['old_mean']:+.3f} | {r['old']} | {r['new_mean']:+.3f} "
                         f"({r['new_ci'][0]:+.3f}, {r['new_ci'][1]:+.3f}) | {r['new']} | {r['outcome']} |")
    speed = speed_check(table, earlier.get("table"))
    if speed:
        lines += ["", "Speed check (wall-clock matching holds only where every run had the same machine to itself):", ""]
        lines += [f"- WARNING {w}" for w in speed]
    prov = provenance(out, methods, seeds)
    lines += ["", "Provenance (run_info.json of each run; the report's own machine first):", "",
              f"- report: {describe(prov['report'])}"]
    for k, v in prov["runs"].items():
        lines.append(f"- {k}: {describe(v)}")
    text = "\n".join(lines) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(out, "compare.json"), "w") as fh:
        json.dump({"table": table, "paired_to_flow_grpo": paired_verdicts(table), "ablations": abl,
                   "time_to_flow_grpo_final": time_to_quality(table), "verdicts": _verdicts(table),
                   "flow_grpo_curve_to_budget": flat, "speed_warnings": speed, "provenance": prov,
                   **({"replication": rep} if replicate_of else {})}, fh, indent=1, default=list)
    return text


def provenance(out: str, methods: list[str], seeds: list[int]) -> dict:
    """The machine and code writing the report, and each run's run_info.json (None for runs made before it
    existed)."""
    from ..utils.provenance import collect, read_run_info
    runs = {f"{m}/seed{s}": read_run_info(os.path.join(out, m, f"seed{s}")) for m in methods for s in seeds
            if os.path.isdir(os.path.join(out, m, f"seed{s}"))}
    return {"report": collect(), "runs": runs}


def plot(out: str, methods: list[str], seeds: list[int], budget_s: Optional[float] = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..stats import seed_summary
    fig, ax = plt.subplots(1, 3, figsize=(15, 3.8))
    ax = [ax[0], ax[2], ax[1]]  # per-seed accuracy, KL, and (middle) the mean over seeds
    for i, m in enumerate(methods):
        curves = {}  # seed -> {seconds: accuracy}, finished runs scored at fixed training seconds
        for j, s in enumerate(seeds):
            rows = _rows(os.path.join(out, m, f"seed{s}"))
            ev = [r for r in rows if "eval_strict_accuracy" in r]
            pts = [r for r in ev if "eval_point_s" in r]
            tr = [r for r in rows if r["epoch"] >= 0 and "eval_point_s" not in r]
            kw = dict(color=f"C{i}", label=m if j == 0 else None, alpha=0.85)
            if pts:  # fixed training seconds, with the run's bootstrap CI over prompts as a band
                x = [0.0] + [r["eval_point_s"] for r in pts]
                ev0 = ev[0] if ev and ev[0]["epoch"] < 0 else pts[0]
                y = [ev0["eval_strict_accuracy"]] + [r["eval_strict_accuracy"] for r in pts]
                lo = [ev0.get("eval_strict_ci_lo", y[0])] + [r.get("eval_strict_ci_lo", r["eval_strict_accuracy"])
                                                             for r in pts]
                hi = [ev0.get("eval_strict_ci_hi", y[0])] + [r.get("eval_strict_ci_hi", r["eval_strict_accuracy"])
                                                             for r in pts]
                ax[0].plot(x, y, "o-", **kw)
                ax[0].fill_between(x, lo, hi, color=f"C{i}", alpha=0.12)
                if finished(os.path.join(out, m, f"seed{s}"), budget_s):
                    curves[s] = dict(zip(x, y))
            else:
                ax[0].plot([r["wall_s"] for r in ev], [r["eval_strict_accuracy"] for r in ev], "o-", **kw)
            ax[1].plot([r["wall_s"] for r in tr], [r["kl"] for r in tr], "-", **kw)
        # mean over seeds at the points every seed was scored, with the 95 % t-interval over seeds as the band
        xs = sorted(set.intersection(*(set(c) for c in curves.values()))) if len(curves) > 1 else []
        if xs:
            ss = [seed_summary([c[x] for c in curves.values()]) for x in xs]
            ax[2].plot(xs, [v["mean"] for v in ss], "o-", color=f"C{i}", label=f"{m} (n={len(curves)})")
            ax[2].fill_between(xs, [v["ci"][0] for v in ss], [v["ci"][1] for v in ss], color=f"C{i}", alpha=0.15)
    ax[0].set(xlabel="training wall-clock (s)", ylabel="held-out strict accuracy", title="accuracy vs wall-clock")
    ax[1].set(xlabel="training wall-clock (s)", ylabel="KL to reference", title="KL vs wall-clock")
    ax[2].set(xlabel="training wall-clock (s)", ylabel="held-out strict accuracy",
              title="mean over seeds, 95 % t-interval")
    ax[0].legend(fontsize=8)
    if ax[2].lines:
        ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"), dpi=100)
    plt.close(fig)


def compare_main(argv) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="densegrpo compare", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/shapes_default.yaml")
    p.add_argument("--methods", default=",".join(m for m in METHODS if m not in OPTIONAL),
                   help=f"comma list of {', '.join(METHODS)} (default: all but {', '.join(OPTIONAL)})")
    p.add_argument("--seeds", default="0,1,2", help="at least 3 for an interval over seeds")
    p.add_argument("--budget-s", type=float, default=240)
    p.add_argument("--eval-every-s", type=float, default=60.0,
                   help="evaluate every this many training seconds and at the budget (the last state <= each point)")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--launcher", default="", help="e.g. 'deepspeed --num_gpus 2' (default: one process)")
    p.add_argument("--replicate-of", default=None, metavar="COMPARE_JSON",
                   help="an earlier comparison's compare.json: the report says which of its verdicts these seeds "
                        "reproduce")
    p.add_argument("--report-only", action="store_true",
                   help="start no run: write the report and plot of the finished runs (unfinished ones are listed)")
    p.add_argument("--archive", action="store_true",
                   help="then move every run's metrics.jsonl into one <out>/metrics.jsonl.gz (how docs/results/ "
                        "keeps comparisons); the report reads it the same way")
    a = p.parse_args(argv)
    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"--methods: unknown {unknown}; available: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if a.replicate_of and not os.path.exists(a.replicate_of):
        print(f"--replicate-of: no such file {a.replicate_of}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in a.seeds.split(",")]
    launcher = a.launcher.split() if a.launcher else [sys.executable]
    extra = {m: [] for m in methods}
    if a.report_only:
        missing = [f"{m}/seed{s}" for m in methods for s in seeds
                   if not finished(os.path.join(a.out, m, f"seed{s}"), a.budget_s)]
        if missing:
            print(f"[compare] not finished (left out of the report): {', '.join(missing)}", flush=True)
    elif any(PRESETS[m]["compare"].get("calibrate") for m in methods):
        schedule = calibrated_schedule(a.config, a.out, a.overrides, sys.executable)
        for m in methods:
            if PRESETS[m]["compare"].get("calibrate"):
                extra[m] = [f"sampling.noise_schedule_file={schedule}"]
    # every run's evaluation before training scores the same base model on the same images: done once, reused
    cache = [f"eval.base_cache={os.path.join(a.out, 'base_eval')}"]
    for s in [] if a.report_only else seeds:
        for m in methods:
            run_one(a.config, m, s, a.budget_s, os.path.join(a.out, m, f"seed{s}"), a.eval_every_s,
                    cache + a.overrides + extra[m], launcher)
    table = summarize(a.out, methods, seeds, a.budget_s)
    cmdline = "densegrpo compare " + " ".join(x for x in argv if x not in ("--report-only", "--archive"))
    print(write_report(a.out, table, methods, seeds, a.budget_s, cmdline, a.replicate_of))
    plot(a.out, methods, seeds, a.budget_s)
    if a.archive:
        print(f"[compare] archived {len(archive_runs(a.out))} runs' metrics in {os.path.join(a.out, ARCHIVE)}")
    return 0
