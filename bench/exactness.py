"""What a run's numbers depend on, measured on this machine: the same tiny run (configs/tiny_jpeg.yaml, 2 epochs)
under other thread counts and other CPU kernel sets (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS
force the AVX2 kernels an AVX2-only machine would pick), each against the reference run: the largest difference of
the logged per-epoch figures and of the trained LoRA weights. A restart and the rank count are checked bitwise by the
test suite (tests/test_train.py); this shows what may differ across machines.

    .venv/bin/python bench/exactness.py [--out runs/exactness]
"""
import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config", "configs/tiny_jpeg.yaml", "--set", "run.progress=false", "--set", "sampling.steps=4",
        "--set", "train.prompts_per_epoch=2", "--set", "train.group_size=4", "--set", "run.epochs=2",
        "--set", "run.save_every=0"]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
VARIANTS = {"reference (2 threads)": {"OMP_NUM_THREADS": "2"},
            "same again": {"OMP_NUM_THREADS": "2"},
            "1 thread": {"OMP_NUM_THREADS": "1"},
            "AVX2 kernels, 2 threads": {"OMP_NUM_THREADS": "2", **AVX2}}
KEYS = ["reward_mean", "loss", "kl", "approx_kl"]


def _run(out: str, env: dict) -> tuple[list, dict]:
    from safetensors.torch import load_file
    r = subprocess.run([sys.executable, "train.py", "--run-dir", out] + ARGS, cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, **env))
    if r.returncode:
        raise SystemExit(f"run {out} failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return rows, load_file(os.path.join(out, "lora", "pytorch_lora_weights.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/exactness")
    a = ap.parse_args()
    runs = {name: _run(os.path.join(a.out, f"v{i}"), env) for i, (name, env) in enumerate(VARIANTS.items())}
    ref_rows, ref_lora = runs["reference (2 threads)"]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}; {os.cpu_count()} cores")
    print(f"{'variant':<26} {'max |d metric|':>16} {'max |d LoRA|':>14}  bitwise")
    for name, (rows, lora) in runs.items():
        dm = max(abs(x[k] - y[k]) for x, y in zip(ref_rows, rows) for k in KEYS)
        dl = max(float((lora[k] - ref_lora[k]).abs().max()) for k in ref_lora)
        print(f"{name:<26} {dm:>16.3e} {dl:>14.3e}  {'yes' if dm == 0 and dl == 0 else 'no'}")


if __name__ == "__main__":
    main()
