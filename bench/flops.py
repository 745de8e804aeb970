"""FLOP counting and the GEMM sweep the benchmarks share (bench/gpu_check.py, bench/limit.py,
bench/memory_vs_plan.py): counts come from the transformer's config alone (modules built on the meta device, counted
by torch.utils.flop_counter: matmuls and attention); the sweep times torch's own GEMM at given (rows, in, out)
shapes on this machine."""
from __future__ import annotations

import time

import torch


def _meta_model(tcfg: dict):
    import diffusers
    cls = getattr(diffusers, tcfg["_class_name"])
    return cls.from_config({k: v for k, v in tcfg.items() if not k.startswith("_")})


def _meta_inputs(tcfg: dict, latent: int, text_tokens: int):
    return dict(hidden_states=torch.zeros(1, tcfg["in_channels"], latent, latent), timestep=torch.ones(1),
                encoder_hidden_states=torch.zeros(1, text_tokens, tcfg["joint_attention_dim"]),
                pooled_projections=torch.zeros(1, tcfg["pooled_projection_dim"]), return_dict=False)


def forward_flops(tcfg: dict, latent: int, text_tokens: int) -> int:
    """FLOPs of one forward of one row (torch.utils.flop_counter: matmuls and attention), on the meta device from
    the transformer's config alone."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        m = _meta_model(tcfg)
        with FlopCounterMode(display=False) as fc:
            m(**_meta_inputs(tcfg, latent, text_tokens))
    return int(fc.get_total_flops())


def lora_step_flops(tcfg: dict, latent: int, text_tokens: int, lora_cfg, family) -> dict:
    """FLOPs per row of a forward and of its backward with LoRA (models.lora.add_lora, the trainer's adapter) on the
    meta device: {"forward": base + adapter matmuls, "backward": the gradients autograd computes (activations and
    LoRA weights; the frozen base weights get none, so the backward is ~1x the forward, not the 2x of full
    fine-tuning), "forward_base": forward_flops without the adapter}."""
    from torch.utils.flop_counter import FlopCounterMode
    from densegrpo_fast.models.lora import add_lora
    with torch.device("meta"):
        m = _meta_model(tcfg)
        with FlopCounterMode(display=False) as fc0:
            m(**_meta_inputs(tcfg, latent, text_tokens))
        add_lora(m, lora_cfg, family)
        with FlopCounterMode(display=False) as fc1:
            out = m(**_meta_inputs(tcfg, latent, text_tokens))[0]
        with FlopCounterMode(display=False) as fc2:
            out.float().sum().backward()
    return {"forward_base": int(fc0.get_total_flops()), "forward": int(fc1.get_total_flops()),
            "backward": int(fc2.get_total_flops())}


class LinearShapes:
    """Records the (rows, in, out) GEMM of every nn.Linear call (peft's LoRA A/B included) while active:
    `with LinearShapes(model) as ls: model(...)`; ls.counts maps (rows, in, out) -> calls."""

    def __init__(self, model):
        self.model = model
        self.counts: dict = {}
        self.handles = []

    def _hook(self, mod, args, out):
        x = args[0]
        rows = x.numel() // x.shape[-1]
        key = (int(rows), int(mod.in_features), int(mod.out_features))
        self.counts[key] = self.counts.get(key, 0) + 1

    def __enter__(self):
        for m in self.model.modules():
            if isinstance(m, torch.nn.Linear):
                self.handles.append(m.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def gemm_rate(rows: int, k: int, n: int, dtype=torch.float32, min_s: float = 0.3, max_iters: int = 200,
              bias: bool = True) -> dict:
    """torch's GEMM (F.linear, as nn.Linear calls it) at (rows, in=k, out=n) on the CPU: median seconds of a call
    over repeats lasting about min_s, and GFLOP/s (2 rows k n FLOPs)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g, dtype=torch.float32).to(dtype)
    w = torch.randn(n, k, generator=g, dtype=torch.float32).to(dtype) / k ** 0.5
    b = torch.randn(n, generator=g, dtype=torch.float32).to(dtype) if bias else None
    f = torch.nn.functional.linear
    f(x, w, b)
    t = time.perf_counter()
    f(x, w, b)
    one = max(time.perf_counter() - t, 1e-7)
    iters = int(min(max_iters, max(3, min_s / one)))
    per = max(1, int(1e-3 / one))              # tiny GEMMs: time batches of calls, not single ones
    times = []
    for _ in range(max(3, iters // per)):
        t = time.perf_counter()
        for _ in range(per):
            f(x, w, b)
        times.append((time.perf_counter() - t) / per)
    times.sort()
    med = times[len(times) // 2]
    return {"rows": rows, "in": k, "out": n, "median_s": med, "GFLOPs": 2.0 * rows * k * n / med / 1e9,
            "best_GFLOPs": 2.0 * rows * k * n / times[0] / 1e9, "repeats": len(times), "calls_per_repeat": per}


def sweep(counts: dict, top: int = 0, **kw) -> dict:
    """gemm_rate for each shape of counts ((rows, in, out) -> calls per forward), and the rate of the whole set:
    its FLOPs over the sum of calls x measured seconds (what the forward's Linear layers would take at torch's GEMM
    speed alone). top > 0: only the shapes with the most FLOPs that cover the bulk (the rest counted at the set's
    rate). -> {"shapes": [...], "GFLOPs": set rate, "flops_per_forward": Linear FLOPs of one forward}."""
    items = sorted(counts.items(), key=lambda kv: -2 * kv[0][0] * kv[0][1] * kv[0][2] * kv[1])
    total = sum(2 * r * k * n * c for (r, k, n), c in items)
    chosen = items[:top] if top else items
    shapes, secs, flops = [], 0.0, 0
    for (r, k, n), c in chosen:
        s = gemm_rate(r, k, n, **kw)
        f = 2 * r * k * n * c
        s.update(calls=c, flop_share=f / total)
        shapes.append(s)
        secs += s["median_s"] * c
        flops += f
    return {"shapes": shapes, "GFLOPs": flops / secs / 1e9, "flops_per_forward": total,
            "covered_share": flops / total}
