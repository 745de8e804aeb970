"""Stable-training study on the shapes benchmark's validation split (never the test split).

    .venv/bin/python -m densegrpo_fast.experiments.stability_study [--epochs 36] [--method sparse]
        [--out runs/stability] [--parallel 2] [--setting NAME=k=v,k=v ...]

Each setting is one training run of configs/shapes_default.yaml with `credit.method=METHOD`, the settings' overrides,
evaluation on the validation split every `--eval-every` epochs (EMA weights, the config's eval settings). Runs that
finished are kept (a second call only summarises). `--parallel N` runs N at once with the CPU threads split between
them. Writes OUT/stability.md (validation accuracy with its bootstrap CI and KL per evaluation) and stability.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {  # name -> overrides; the default config's values: lr 1e-3, clip 1e-3, beta 0.01, ema 0.5
    "default": [],
    "beta0.04": ["train.beta_kl=0.04"],
    "lr3e-4": ["train.lr=3e-4"],
    "clip2e-4": ["train.clip_range=2e-4"],
    "ema0.9": ["train.ema_decay=0.9"],
}


def rows(run: str) -> list[dict]:
    path = os.path.join(run, "metrics.jsonl")
    return [json.loads(x) for x in open(path)] if os.path.exists(path) else []


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/shapes_default.yaml")
    p.add_argument("--method", default="sparse")
    p.add_argument("--epochs", type=int, default=36)
    p.add_argument("--eval-every", type=int, default=6)
    p.add_argument("--out", default="runs/stability")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    names = a.settings.split(",")
    threads = max(1, (os.cpu_count() or 2) // a.parallel)
    todo = []
    for n in names:
        run = os.path.join(a.out, n)
        if any(r.get("epoch") == a.epochs - 1 and "eval_strict_accuracy" in r for r in rows(run)):
            continue
        cmd = [sys.executable, "train.py", "--config", a.config, "--run-dir", run]
        sets = [f"credit.method={a.method}", f"run.epochs={a.epochs}", f"run.eval_every={a.eval_every}",
                "eval.split=validation", "run.save_every=6", "run.progress=false"] + SETTINGS[n] + a.overrides
        for s in sets:
            cmd += ["--set", s]
        if os.path.exists(os.path.join(run, "checkpoints", "latest")):
            cmd.append("--resume")
        todo.append((n, cmd))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    while todo:
        batch, todo = todo[:a.parallel], todo[a.parallel:]
        procs = []
        for n, cmd in batch:
            os.makedirs(os.path.join(a.out, n), exist_ok=True)
            print(f"[stability] {n}: {' '.join(cmd)}", flush=True)
            procs.append(subprocess.Popen(cmd, env=env, stdout=open(os.path.join(a.out, n + ".log"), "w"),
                                          stderr=subprocess.STDOUT))
        for pr in procs:
            pr.wait()
    lines = [f"Validation strict accuracy (95 % bootstrap CI over prompts) and KL, credit.method={a.method}, "
             f"{a.epochs} epochs, `python -m densegrpo_fast.experiments.stability_study --method {a.method} "
             f"--epochs {a.epochs}`", "",
             "| setting | " + " | ".join(f"epoch {e}" for e in [-1] + list(range(a.eval_every - 1, a.epochs,
                                                                               a.eval_every))) + " | KL first → last |",
             "|---|" + "---|" * (2 + len(range(a.eval_every - 1, a.epochs, a.eval_every)))]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, n in enumerate(names):
        rs = rows(os.path.join(a.out, n))
        ev = [r for r in rs if "eval_strict_accuracy" in r]
        tr = [r for r in rs if r["epoch"] >= 0 and "kl" in r]
        if not ev or not tr:
            continue
        cells = [f"{r['eval_strict_accuracy']:.3f} ({r.get('eval_strict_ci_lo', float('nan')):.2f}–"
                 f"{r.get('eval_strict_ci_hi', float('nan')):.2f})" for r in ev]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {tr[0]['kl']:.2g} → {tr[-1]['kl']:.2g} |")
        x = [r["epoch"] + 1 for r in ev]
        ax[0].plot(x, [r["eval_strict_accuracy"] for r in ev], "o-", color=f"C{i}", label=n)
        ax[0].fill_between(x, [r.get("eval_strict_ci_lo", 0) for r in ev], [r.get("eval_strict_ci_hi", 0) for r in ev],
                           color=f"C{i}", alpha=0.12)
        ax[1].semilogy([r["epoch"] + 1 for r in tr], [max(r["kl"], 1e-8) for r in tr], "-", color=f"C{i}", label=n)
    ax[0].set(xlabel="epochs trained", ylabel="validation strict accuracy")
    ax[1].set(xlabel="epochs trained", ylabel="KL to the reference (training)")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "stability.png"), dpi=100)
    text = "\n".join(lines) + "\n"
    open(os.path.join(a.out, "stability.md"), "w").write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
