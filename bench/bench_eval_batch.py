"""Evaluation sampling speed against eval.batch, side by side in one run (a benchmark, not a test).

Part 1 sweeps the samples per ODE batch on the shipped tiny SD3 model (10 Euler steps, CFG 4.5, fp32): for each
batch size, `eval.generate` of the same N test-split samples, in alternating rounds; it prints the median
milliseconds per sample and the ratio to batch 256 (the GPU's auto batch and the CPU default before auto).
Part 2 (--full) runs `densegrpo eval` of the shipped model end to end (1,152 images) at --batch 256 and at the
default (auto), each in a fresh process, and prints wall seconds, sampling seconds and strict accuracy of each.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python bench/bench_eval_batch.py --batches 8,16,32,64,128,256 --full
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep(batches: list, n: int, rounds: int, device: str = "cpu") -> dict:
    """batch -> median ms per sample of generate() over the first n (prompt, sample) pairs of the test split."""
    from densegrpo_fast.config import ModelConfig
    from densegrpo_fast.eval import DEFAULT_MODEL, generate
    from densegrpo_fast.models import build_models
    from densegrpo_fast.prompts.shapes import load_split
    m = build_models(ModelConfig(path=DEFAULT_MODEL, max_sequence_length=4), device)
    prompts = [p.text for p in load_split("test")]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(4)][:n]
    sig = m.sigmas(10, 3.0, device=device)

    def run(b):
        return generate(m.transformer, m.text, m.decode, m.latent_shape, prompts, pairs, sig, 4.5, 0, device,
                        m.family, b)
    run(min(batches))                                  # warm-up: allocator, oneDNN primitives
    times = {b: [] for b in batches}
    for r in range(rounds):
        for b in (batches if r % 2 == 0 else batches[::-1]):
            t0 = time.perf_counter()
            run(b)
            times[b].append(time.perf_counter() - t0)
    return {b: 1000 * statistics.median(t) / n for b, t in times.items()}


def full_eval(batch: int) -> dict:
    """`densegrpo eval` at --batch (0 = auto) in a fresh process -> wall seconds, sampling seconds, strict acc."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "densegrpo_fast.cli", "eval", "--batch", str(batch), "--out", out,
                        "--no-progress"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        with open(os.path.join(out, "eval.json")) as f:
            rep = json.load(f)
    return {"batch": rep["batch"], "wall_s": round(wall, 1), "sample_s": rep["sample_s"],
            "strict_accuracy": rep["strict_accuracy"], "partial_score": rep["partial_score"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="8,16,32,64,128,256")
    p.add_argument("--samples", type=int, default=256, help="samples per timed generate() call")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--full", action="store_true", help="also `densegrpo eval` end to end at batch 256 and auto")
    a = p.parse_args(argv)
    batches = [int(x) for x in a.batches.split(",")]
    from conftest import device_name                  # bench/conftest.py: the CPU's model name or the GPU's
    print(f"machine: {device_name()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    ms = sweep(batches, a.samples, a.rounds)
    ref = ms.get(256)
    print(f"\n| eval.batch | ms per sample (median of {a.rounds}) | vs batch 256 |\n|---|---|---|")
    for b, v in ms.items():
        print(f"| {b} | {v:.1f} | {'x%.2f' % (ref / v) if ref else '-'} |")
    if a.full:
        print("\n| densegrpo eval | batch | wall s | sampling s | strict accuracy | partial |\n|---|---|---|---|---|---|")
        for name, b in (("--batch 256", 256), ("default (auto)", 0)):
            r = full_eval(b)
            print(f"| {name} | {r['batch']} | {r['wall_s']} | {r['sample_s']} | {r['strict_accuracy']:.4f} | "
                  f"{r['partial_score']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
