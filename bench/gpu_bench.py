"""Timing pieces of the GPU check (bench/gpu_check.py runs them; `python bench/gpu_bench.py [--cpu]` prints the op
table alone). Every function takes a device: on CUDA the medians come from CUDA events, on the CPU from
perf_counter, so the CPU mode of the check runs this same code.

- copy_bandwidth: device-to-device copy, bytes read + written per second (the bound for the fused ops);
- matmul_rate: a square bf16 matmul, FLOP/s (the bound for the network);
- op_cases: the fused ops `sde_step` (sampling) and `sde_logprob` forward + backward (training) at the given latent
  shapes and batch sizes, per backend: median time, GB/s, fraction of the copy bandwidth, speed-up over the torch
  reference ops.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from densegrpo_fast import ops  # noqa: E402
from densegrpo_fast.rollout.schedule import flow_sigmas  # noqa: E402


def timed(fn, device, iters: int = 50, warmup: int = 10) -> float:
    """Median seconds of fn() on device (CUDA events per call; perf_counter on the CPU)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    ts = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def copy_bandwidth(device, numel: int, iters: int = 50) -> float:
    """GB/s of dst.copy_(src) for numel fp32 elements (2 x 4 x numel bytes moved per copy)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), device, iters, max(2, iters // 5)) / 1e9


def matmul_rate(device, n: int, dtype=torch.bfloat16, iters: int = 20) -> float:
    """TFLOP/s of an n x n x n matmul in dtype (2 n^3 FLOPs)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, device, iters, max(2, iters // 5)) / 1e12


def op_cases(device, latent: tuple, batches: tuple, dtypes: tuple, backends: list, copy_gbps: float,
             steps: int = 10, iters: int = 50) -> list[dict]:
    """sde_step and sde_logprob fwd+bwd per (dtype, batch, backend). Bytes counted: sde_step reads latent, velocity
    and noise and writes the next latent (4 tensors); sde_logprob reads latent, velocity and next latent forward,
    the same three again backward and writes the velocity gradient (7)."""
    sig, lv = flow_sigmas(steps, device=device), torch.full((steps,), 0.7, device=device)
    rows = []
    for dtype in dtypes:
        for B in batches:
            g = torch.Generator(device=device).manual_seed(B)
            z, v, zn, eps = (torch.randn(B, *latent, generator=g, device=device).to(dtype) for _ in range(4))
            k = torch.randint(0, steps - 1, (B,), generator=g, device=device)
            size = z.numel() * z.element_size()

            def step(be):
                ops.sde_step(z, v, sig, lv, k, eps, backend=be)

            def logprob(be):
                vv = v.detach().requires_grad_(True)
                lp, _ = ops.sde_logprob(z, vv, zn, sig, lv, k, backend=be)
                lp.sum().backward()

            for name, fn, nbytes in (("sde_step", step, 4 * size), ("sde_logprob fwd+bwd", logprob, 7 * size)):
                t_ref = None
                for be in ["torch"] + [b for b in backends if b != "torch"]:
                    t = timed(lambda: fn(be), device, iters, max(2, iters // 5))
                    t_ref = t if be == "torch" else t_ref
                    gbps = nbytes / t / 1e9
                    rows.append({"op": name, "batch": B, "latent": list(latent), "dtype": str(dtype)[6:],
                                 "backend": be, "median_s": t, "GBps": gbps, "frac_copy_bw": gbps / copy_gbps,
                                 "x_torch": t_ref / t})
    return rows


def op_backends(device) -> list[str]:
    """The fast backends that run on tensors of this device (the torch reference is always timed too)."""
    have = ops.available_backends()
    want = ("triton", "cuda") if torch.device(device).type == "cuda" else ("cpp",)
    return [b for b in want if b in have]


if __name__ == "__main__":
    dev = "cpu" if "--cpu" in sys.argv or not torch.cuda.is_available() else "cuda"
    cpu = dev == "cpu"
    bw = copy_bandwidth(dev, 2 ** 20 if cpu else 256 * 2 ** 20)
    cases = op_cases(dev, (16, 8, 8) if cpu else (16, 64, 64), (2, 3) if cpu else (8, 64),
                     (torch.float32, torch.bfloat16), op_backends(dev), bw, iters=5 if cpu else 50)
    print(f"device: {torch.cuda.get_device_name() if not cpu else 'cpu'}, torch {torch.__version__}, "
          f"copy {bw:.0f} GB/s")
    for r in cases:
        print(f"{r['op']:<20} B={r['batch']:<3} {r['dtype']:<8} {r['backend']:<6} {r['median_s'] * 1e6:8.0f} us "
              f"{r['GBps']:7.1f} GB/s {r['frac_copy_bw']:5.2f} of copy  x{r['x_torch']:.1f} vs torch")
