"""How the held-out score's CI shrinks with samples per prompt and ODE steps (the shapes benchmark).

    .venv/bin/python -m densegrpo_fast.experiments.eval_ci_study [--model DIR] [--split test] [--grid K:STEPS,...]

For each setting: `densegrpo eval` on the split (fixed evaluation noise, eval.seed 0), the score (mean over
categories), its 95 % bootstrap CI over prompts (within categories), the half-width and the seconds the evaluation
took on this machine (model load excluded). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import time

from ..eval import DEFAULT_MODEL, shapes_eval_from_folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--split", default="test")
    p.add_argument("--grid", default="1:20,2:20,4:20,4:10,8:10,2:40")
    a = p.parse_args()
    shapes_eval_from_folder(a.model, None, a.split, 2, samples_per_prompt=1)  # warm-up (load, caches)
    rows = []
    for item in a.grid.split(","):
        k, steps = (int(x) for x in item.split(":"))
        t = time.perf_counter()
        r = shapes_eval_from_folder(a.model, None, a.split, steps, samples_per_prompt=k)
        sec = time.perf_counter() - t
        lo, hi = r["strict_accuracy_ci95"]
        rows.append((k, steps, r["n_images"], r["strict_accuracy"], lo, hi, (hi - lo) / 2, sec))
        print(rows[-1], flush=True)
    print(f"\n| samples / prompt | ODE steps | images | strict acc. | 95 % CI | half-width | seconds |\n"
          f"|---|---|---|---|---|---|---|")
    for k, steps, n, acc, lo, hi, hw, sec in rows:
        print(f"| {k} | {steps} | {n} | {acc:.3f} | {lo:.3f}–{hi:.3f} | {hw:.3f} | {sec:.0f} |")


if __name__ == "__main__":
    main()
