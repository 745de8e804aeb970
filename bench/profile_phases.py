"""Profile each phase of an epoch with torch.profiler and write the top operators to a Markdown table.

    python bench/profile_phases.py [--compile off|default] [--out docs/results/profile_cpu.md]

Phases (the shipped tiny SD3 model unless --model; the same sizes as bench/vs_flow_grpo.py): the SDE rollout of one
batch with its decode, the DenseGRPO staircase rollout of one batch with its T+1 decodes, and one training
micro-step (CFG policy forward, reference forward, fused log-prob + loss, backward, AdamW). Each phase is run once
to warm up (and compile), then profiled; the table lists the operators with the most self time (CPU, and CUDA on a
GPU), and the share of the phase's wall time spent inside the transformer's forward/backward.
"""
from __future__ import annotations

import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_flow_grpo as vs  # noqa: E402


def phases(S, a):
    opt = torch.optim.AdamW(S.trainable, lr=1e-5)
    x = vs.batch_of_transitions(S, a.micro_batch, 7)
    return {
        f"rollout (B={a.batch}, {a.steps} SDE steps, CFG, decode)": lambda: vs.our_rollout(S, a.batch, 1),
        f"dense rollout (B={a.dense_batch}, staircase + {a.steps + 1} decodes/trajectory + rewards)":
            lambda: vs.our_dense(S, a.dense_batch, 1),
        f"train micro-step (B={a.micro_batch}, policy fwd+bwd, reference fwd, AdamW)":
            lambda: vs.our_train_step(S, opt, x),
    }


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead", "max-autotune"])
    p.add_argument("--out", default=None, help="Markdown file (default: docs/results/profile_<cpu|gpu>[_compiled].md)")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--model", default=None)
    a0 = p.parse_args(argv)
    a = vs.parse(["--ours-only", "--compile", a0.compile] + (["--model", a0.model] if a0.model else []))
    from densegrpo_fast.utils.cli_helpers import _quiet
    _quiet()
    S = vs.Setup(a)
    gpu = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import device_name
    lines = [f"# Profile of an epoch's phases ({'GPU' if gpu else 'CPU'})", "",
             f"`python bench/profile_phases.py --compile {a.compile}` on {device_name()}, torch {torch.__version__}; "
             f"shipped tiny SD3 (64 px, 4x16x16 latents), {a.steps} steps, CFG {a.guidance}, {a.text_slots} T5 slots, "
             f"LoRA r={a.lora_r}, fp32. Times are self times (an operator's own, without its children).", ""]
    # the transformer's share: a record_function around every forward of the network
    tr = S.tr
    orig_forward = tr.forward

    def forward(*args, **kw):
        with record_function("transformer.forward"):
            return orig_forward(*args, **kw)

    tr.forward = forward
    for name, fn in phases(S, a).items():
        fn()
        vs.sync()
        t = time.perf_counter()
        with profile(activities=acts) as prof:
            with record_function("phase"):
                fn()
                vs.sync()
        wall = time.perf_counter() - t
        ev = prof.key_averages()
        tot = {e.key: e for e in ev}
        net = tot.get("transformer.forward")
        net_s = (net.cpu_time_total if net else 0) / 1e6
        share = (f"inside transformer.forward (CPU, incl. children): {net_s * 1e3:.0f} ms = "
                 f"{100 * net_s / wall:.0f} % (the backward runs outside the forward's range)" if a.compile == "off"
                 else "the transformer runs as compiled graphs (`CompiledFxGraph` rows: the fused elementwise work; "
                      "GEMMs and attention stay aten calls)")
        lines += [f"## {name}", "", f"wall {wall * 1e3:.0f} ms under the profiler; {share}.", "",
                  "| operator | self time ms | % of phase | calls |", "|---|---|---|---|"]
        rows = sorted((e for e in ev if e.key not in ("phase", "transformer.forward")),
                      key=lambda e: getattr(e, key), reverse=True)[:a0.top]
        for e in rows:
            st = getattr(e, key) / 1e3
            lines.append(f"| `{e.key}` | {st:.1f} | {100 * st / 1e3 / wall:.1f} | {e.count} |")
        lines.append("")
    out = a0.out or os.path.join(vs.ROOT, "docs", "results", f"profile_{'gpu' if gpu else 'cpu'}"
                                 f"{'' if a.compile == 'off' else '_compiled'}.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
