"""GPU checks in one process, a short table last (run by bench/gpu_check.sh on a lent H100/H200).

1. Triton and CUDA ops vs torch eager at SD3.5-M 512 px latents (16x64x64), batch 9 and 64, fp32 and bf16:
   median time (CUDA events), achieved GB/s, fraction of the device-to-device copy bandwidth measured here.
2. An SD3.5-Medium-sized SD3Transformer2DModel with random weights (bf16, batch 9, CFG -> 18), a 10-step SDE
   rollout: eager vs CUDA-graph replay (GraphedSDEStep), seconds per rollout.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from densegrpo_fast import ops  # noqa: E402
from densegrpo_fast.rollout.schedule import flow_sigmas  # noqa: E402


def cuda_time(fn, iters=50, warmup=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def op_table():
    rows = []
    src = torch.randn(256 * 2 ** 20, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() * 4 / cuda_time(lambda: dst.copy_(src)) / 1e9
    rows.append(("copy 1 GiB", "", "", f"{copy_bw:.0f}", "1.00", ""))
    sig, lv = flow_sigmas(10, device="cuda"), torch.full((10,), 0.7, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        for B in (9, 64):
            z, v, zn = (torch.randn(B, 16, 64, 64, device="cuda").to(dtype) for _ in range(3))
            k = torch.randint(0, 9, (B,), device="cuda")
            nbytes = 7 * z.numel() * z.element_size()

            def fb(backend):
                vv = v.detach().requires_grad_(True)
                lp, _ = ops.sde_logprob(z, vv, zn, sig, lv, k, backend=backend)
                lp.sum().backward()
            t_eager = cuda_time(lambda: fb("torch"))
            for be in [b for b in ("triton", "cuda") if b in ops.available_backends()]:
                t = cuda_time(lambda: fb(be))
                bw = nbytes / t / 1e9
                rows.append((f"sde_logprob fwd+bwd B={B} {str(dtype)[6:]}", be, f"{t * 1e6:.0f}", f"{bw:.0f}",
                             f"{bw / copy_bw:.2f}", f"{t_eager / t:.1f}"))
    return rows


def rollout_table():
    from diffusers import SD3Transformer2DModel
    from densegrpo_fast.rollout.graphs import GraphedSDEStep, graphed_sde_rollout
    from densegrpo_fast.rollout.sampler import Conditioning, GuidedVelocity
    torch.manual_seed(0)
    # SD3.5-Medium's transformer config (random weights): 24 MMDiT-X layers, 24 heads x 64, qk RMSNorm.
    tr = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                               num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                               pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                               dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    tr = tr.to("cuda", torch.bfloat16).eval()
    B = 9
    cond = Conditioning(torch.randn(B, 333, 4096, device="cuda", dtype=torch.bfloat16),
                        torch.randn(B, 2048, device="cuda", dtype=torch.bfloat16),
                        torch.randn(B, 333, 4096, device="cuda", dtype=torch.bfloat16),
                        torch.randn(B, 2048, device="cuda", dtype=torch.bfloat16))
    z0 = torch.randn(B, 16, 64, 64, device="cuda")
    sig, lv = flow_sigmas(10, device="cuda"), torch.full((10,), 0.7, device="cuda")
    g = torch.Generator(device="cuda")
    eager = GraphedSDEStep(GuidedVelocity(tr, 4.5), sig, lv, enabled=False)
    graphed = GraphedSDEStep(GuidedVelocity(tr, 4.5), sig, lv, enabled=True)
    with torch.no_grad():
        t_e = cuda_time(lambda: graphed_sde_rollout(eager, cond, z0, g.manual_seed(0)), iters=5, warmup=2)
        t_g = cuda_time(lambda: graphed_sde_rollout(graphed, cond, z0, g.manual_seed(0)), iters=5, warmup=2)
        a, _ = graphed_sde_rollout(eager, cond, z0, g.manual_seed(1))
        b, _ = graphed_sde_rollout(graphed, cond, z0, g.manual_seed(1))
    err = (a - b).abs().max().item()
    return [("SD3.5-M rollout 10 steps B=9 CFG bf16", "eager", f"{t_e * 1e3:.0f} ms", "", "", "1.00"),
            ("SD3.5-M rollout 10 steps B=9 CFG bf16", "cuda graph", f"{t_g * 1e3:.0f} ms", "", "",
             f"{t_e / t_g:.2f} (max |diff| {err:.1e})")]


if __name__ == "__main__":
    assert torch.cuda.is_available(), "needs a GPU"
    rows = op_table() + rollout_table()
    head = ("case", "path", "median", "GB/s", "frac_copy_bw", "x_eager")
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for r in [head] + rows:
        print("  ".join(str(x).ljust(n) for x, n in zip(r, w)))
