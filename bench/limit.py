"""The distance to the machine's limit: the network's achieved FLOP/s against torch's own GEMM rate at the same
shapes, measured in the same run, and the share of an epoch's wall time the network takes.

    python bench/limit.py [--part tiny|sd35m|both] [--epochs 2] [--layers 24] [--out FILE.json]

One thread (torch.set_num_threads(1)), fp32, CPU.
  tiny   the shipped tiny SD3 (configs/shapes_default.yaml, eval off) trained by densegrpo_fast's Trainer for
         --epochs epochs. Every transformer forward is timed (a wrapper around its forward: rows, grad mode, adapter
         on/off); every backward through it is timed from its output's gradient to the last LoRA gradient
         (post-accumulate hooks; DeepSpeed's gradient hooks run inside that span). Shares are of the epoch's wall
         time (Trainer.run_epoch). After the epochs, one no-grad forward per batch layout the epoch used records the
         (rows, in, out) of every nn.Linear call (LoRA's A and B included) and those GEMMs are timed alone
         (F.linear, bench/flops.py sweep); the matmul rate = the epoch's Linear FLOPs / their summed solo times.
  sd35m  an SD3.5-Medium-sized SD3Transformer2DModel (tests/data/sd35m config, random weights, bench/gpu_check.py's
         build_model) at 256 px with the recipe's LoRA r 32 (configs/recipes/sd35m_flow_grpo.yaml, 256 T5 tokens):
         one rollout forward (sample_batch 1 with CFG: 2 rows, no grad), one training forward of the conditional row
         with grad and its backward (sde_logprob + grpo_loss; the unconditional half is the rollout forward's,
         a constant, as train.cfg_grad=cond makes it), then the same GEMM sweep at the forward's shapes.
         --layers N < 24 keeps the first N blocks; seconds are then also given scaled to 24 blocks by the FLOP
         counts (per-block cost is uniform up to the dual-attention share).
FLOPs: per row from the config on the meta device (bench/flops.py: torch.utils.flop_counter, matmuls and
attention; the forward with the LoRA adapter where it was on; the backward as autograd runs it with frozen base
weights: activation gradients + LoRA weight gradients, about 1x the forward, not the 2x of full fine-tuning).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)
import flops as F  # noqa: E402


class Recorder:
    """Times every forward of `transformer` and every backward through it (see the module docstring)."""

    def __init__(self, transformer, trainable):
        self.tr = transformer
        self.orig = transformer.forward
        self.fwd: list = []
        self.bwd: list = []
        self._start = self._last = None
        self._rows = 0
        self.lora_mod = next(m for m in transformer.modules() if hasattr(m, "lora_A"))
        transformer.forward = self._forward
        for p in trainable:
            p.register_post_accumulate_grad_hook(self._grad_done)

    def _forward(self, *args, **kw):
        hs = kw["hidden_states"] if "hidden_states" in kw else args[0]
        ehs = kw.get("encoder_hidden_states")
        t = time.perf_counter()
        out = self.orig(*args, **kw)
        dt = time.perf_counter() - t
        rec = {"rows": int(hs.shape[0]), "latent": int(hs.shape[-1]), "text": int(ehs.shape[1]),
               "grad": torch.is_grad_enabled(), "lora": not self.lora_mod.disable_adapters, "s": dt}
        self.fwd.append(rec)
        y = out[0] if isinstance(out, tuple) else out.sample
        if y.requires_grad:
            y.register_hook(self._out_grad)
            self._rows += rec["rows"]
            self._key = (rec["latent"], rec["text"])
        return out

    def _out_grad(self, g):
        if self._start is None:
            self._start = time.perf_counter()

    def _grad_done(self, p):
        self._last = time.perf_counter()

    def end_backward(self):
        if self._start is not None and self._last is not None:
            self.bwd.append({"rows": self._rows, "s": self._last - self._start, "latent": self._key[0],
                             "text": self._key[1]})
        self._start = self._last = None
        self._rows = 0

    def remove(self):
        self.tr.forward = self.orig


def flop_totals(fwd: list, bwd: list, per_row: dict) -> dict:
    """Sum FLOPs and seconds of the recorded forwards and backwards. per_row[(latent, text)] = lora_step_flops."""
    out = {"forward_s": 0.0, "forward_flops": 0, "forwards": len(fwd), "forward_rows": 0,
           "backward_s": 0.0, "backward_flops": 0, "backwards": len(bwd), "backward_rows": 0}
    for r in fwd:
        f = per_row[(r["latent"], r["text"])]
        out["forward_s"] += r["s"]
        out["forward_flops"] += r["rows"] * (f["forward"] if r["lora"] else f["forward_base"])
        out["forward_rows"] += r["rows"]
    for r in bwd:
        out["backward_s"] += r["s"]
        out["backward_flops"] += r["rows"] * per_row[(r["latent"], r["text"])]["backward"]
        out["backward_rows"] += r["rows"]
    out["forward_GFLOPs"] = out["forward_flops"] / max(out["forward_s"], 1e-12) / 1e9
    out["backward_GFLOPs"] = out["backward_flops"] / max(out["backward_s"], 1e-12) / 1e9 if bwd else None
    return out


def linear_counts(transformer, layouts: dict, tcfg) -> dict:
    """(rows, in, out) -> calls over the recorded forwards: one no-grad forward per distinct layout (rows, latent,
    text, lora) with nn.Linear hooks, times the number of forwards of that layout."""
    from contextlib import nullcontext
    from densegrpo_fast.models.lora import adapter_disabled
    total: dict = {}
    for (rows, lat, text, lora), n in layouts.items():
        x = torch.randn(rows, tcfg["in_channels"], lat, lat)
        e = torch.randn(rows, text, tcfg["joint_attention_dim"])
        p = torch.randn(rows, tcfg["pooled_projection_dim"])
        with torch.no_grad(), (nullcontext() if lora else adapter_disabled(transformer)), \
                F.LinearShapes(transformer) as ls:
            transformer(hidden_states=x, timestep=torch.full((rows,), 500.0), encoder_hidden_states=e,
                        pooled_projections=p, return_dict=False)
        for key, c in ls.counts.items():
            total[key] = total.get(key, 0) + c * n
    return total


def top_shapes(sw: dict, n: int = 5) -> list:
    return [{k: s[k] for k in ("rows", "in", "out", "calls", "flop_share", "GFLOPs")} for s in sw["shapes"][:n]]


# ------------------------------------------------------------------------------------------------------ tiny

def part_tiny(epochs: int) -> dict:
    from densegrpo_fast.config import load_config
    from densegrpo_fast.train.trainer import Trainer
    from densegrpo_fast.utils.cli_helpers import quiet
    quiet()
    cfg_path = os.path.join(ROOT, "configs", "shapes_default.yaml")
    overrides = ["run.progress=false", "eval.enabled=false", "run.save_every=0", f"run.epochs={epochs}",
                 "model.compile=off"]
    cfg = load_config(cfg_path, overrides)
    T = Trainer(cfg, tempfile.mkdtemp(prefix="limit_tiny_"))
    tr = T.models.transformer
    with open(os.path.join(ROOT, cfg.model.path, "transformer", "config.json")) as fh:
        tcfg = json.load(fh)
    rec = Recorder(tr, T.trainable)
    eng_backward = T.engine.backward

    def backward(*a, **kw):
        r = eng_backward(*a, **kw)
        rec.end_backward()
        return r

    T.engine.backward = backward
    per_epoch = []
    for e in range(epochs):
        n0, b0 = len(rec.fwd), len(rec.bwd)
        t = time.perf_counter()
        row = T.run_epoch(e)
        wall = time.perf_counter() - t
        per_epoch.append({"epoch": e, "wall_s": wall, "epoch_s": row["epoch_s"], "rollout_s": row["rollout_s"],
                          "reward_s": row["reward_s"], "train_s": row["train_s"],
                          "fwd": rec.fwd[n0:], "bwd": rec.bwd[b0:]})
    rec.remove()
    T.engine.backward = eng_backward
    keys = {(r["latent"], r["text"]) for ep in per_epoch for r in ep["fwd"]}
    per_row = {k: F.lora_step_flops(tcfg, k[0], k[1], cfg.model.lora, T.models.family) for k in keys}
    last = per_epoch[-1]
    tot = flop_totals(last["fwd"], last["bwd"], per_row)
    layouts: dict = {}
    for r in last["fwd"]:
        key = (r["rows"], r["latent"], r["text"], r["lora"])
        layouts[key] = layouts.get(key, 0) + 1
    tr.eval()
    counts = linear_counts(tr, layouts, tcfg)
    sw = F.sweep(counts, min_s=0.2)
    out = {"config": os.path.relpath(cfg_path, ROOT), "overrides": overrides, "epochs": epochs,
           "per_epoch": [{k: v for k, v in ep.items() if k not in ("fwd", "bwd")} |
                         {"totals": flop_totals(ep["fwd"], ep["bwd"], per_row)} for ep in per_epoch],
           "measured_epoch": last["epoch"], "epoch_wall_s": last["epoch_s"], **tot,
           "per_row_flops": {f"{k[0]}x{k[0]} latent, {k[1]} text tokens": v for k, v in per_row.items()},
           "layouts": {f"{r} rows, adapter {'on' if lo else 'off'}": n for (r, _, _, lo), n in layouts.items()},
           "matmul_GFLOPs": sw["GFLOPs"], "linear_flop_share": sw["flops_per_forward"] / max(1, sum(
               n * r * (per_row[(la, tx)]["forward"] if lo else per_row[(la, tx)]["forward_base"])
               for (r, la, tx, lo), n in layouts.items())), "top_shapes": top_shapes(sw),
           "n_shapes": len(sw["shapes"])}
    out["forward_share"] = tot["forward_s"] / last["epoch_s"]
    out["backward_share"] = tot["backward_s"] / last["epoch_s"]
    out["forward_frac_matmul"] = tot["forward_GFLOPs"] / sw["GFLOPs"]
    out["backward_frac_matmul"] = (tot["backward_GFLOPs"] or 0) / sw["GFLOPs"]
    return out


# ----------------------------------------------------------------------------------------------------- sd35m

def part_sd35m(layers: int) -> dict:
    from densegrpo_fast import ops
    from memory_vs_plan import build_sd35m, rollout_step, sd35m_settings
    t_all = time.perf_counter()
    st = sd35m_settings(256, layers)
    cfg, tcfg = st["cfg"], st["tcfg"]
    sc, tc = cfg.sampling, cfg.train
    t = time.perf_counter()
    m = build_sd35m(st)
    build_s = time.perf_counter() - t
    tr = m["transformer"]
    rec = Recorder(tr, m["trainable"])
    with F.LinearShapes(tr) as ls:                     # the rollout forward's GEMMs, recorded as it runs
        v_roll = rollout_step(st, m)
    roll_counts = dict(ls.counts)
    # training: the conditional row with grad; v = sg(v_roll) + w (v_c - sg(v_c)) has cfg_velocity's value
    # (sg(v_u) + w (v_c - sg(v_u)), v_roll from the same weights and inputs) and its gradient (w dv_c)
    tr.train()
    z, k = m["z"], m["k"]
    vc = m["family"].velocity(tr, z, m["sigmas"][k], m["cond"], 1.0).float()
    v = v_roll.detach() + sc.guidance * (vc - vc.detach())
    lp, kl = ops.sde_logprob(z, v, m["zn"], m["sigmas"], m["levels"], k, None, sc.variant, sc.logprob_reduction,
                             sc.cps_logprob)
    loss, _, _ = ops.grpo_loss(lp, lp.detach() - 1e-3, torch.ones_like(lp), torch.ones_like(lp), tc.clip_range, kl,
                               tc.beta_kl)
    t = time.perf_counter()
    loss.backward()
    backward_call_s = time.perf_counter() - t
    rec.end_backward()
    rec.remove()
    key = (st["latent"], st["text_tokens"])
    t = time.perf_counter()
    per_row = {key: F.lora_step_flops(tcfg, key[0], key[1], cfg.model.lora, m["family"])}
    count_s = time.perf_counter() - t
    tot = flop_totals(rec.fwd, rec.bwd, per_row)
    t = time.perf_counter()
    sw = F.sweep(roll_counts, top=8, min_s=0.5)
    sweep_s = time.perf_counter() - t
    fr, fg, bw = rec.fwd[0], rec.fwd[1], rec.bwd[0]
    f = per_row[key]
    scale = 1.0
    if layers != 24:
        with open(os.path.join(ROOT, "tests", "data", "sd35m", "transformer", "config.json")) as fh:
            full = json.load(fh)
        scale = F.forward_flops(full, key[0], key[1]) / f["forward_base"]
    out = {"layers": layers, "resolution": 256, "tokens": st["plan"]["tokens"], "text_tokens": key[1],
           "latent": key[0], "lora_r": cfg.model.lora.r, "params_transformer": st["plan"]["params"]["transformer"],
           "per_row_flops": f, "scale_to_24_blocks": scale,
           "rollout_forward": {"rows": fr["rows"], "s": fr["s"], "GFLOP": fr["rows"] * f["forward"] / 1e9,
                               "GFLOPs": fr["rows"] * f["forward"] / fr["s"] / 1e9},
           "train_forward": {"rows": fg["rows"], "s": fg["s"], "GFLOP": fg["rows"] * f["forward"] / 1e9,
                             "GFLOPs": fg["rows"] * f["forward"] / fg["s"] / 1e9},
           "backward": {"rows": bw["rows"], "s": bw["s"], "loss_backward_call_s": backward_call_s,
                        "GFLOP": bw["rows"] * f["backward"] / 1e9,
                        "GFLOPs": bw["rows"] * f["backward"] / bw["s"] / 1e9},
           **{k: tot[k] for k in ("forward_GFLOPs", "backward_GFLOPs")},
           "matmul_GFLOPs": sw["GFLOPs"], "matmul_covered_share": sw["covered_share"],
           "linear_flop_share": sw["flops_per_forward"] / (fr["rows"] * f["forward"]), "top_shapes": top_shapes(sw, 8),
           "seconds": {"build": build_s, "flop_count": count_s, "sweep": sweep_s,
                       "total": time.perf_counter() - t_all}}
    out["forward_frac_matmul"] = out["rollout_forward"]["GFLOPs"] / sw["GFLOPs"]
    out["train_forward_frac_matmul"] = out["train_forward"]["GFLOPs"] / sw["GFLOPs"]
    out["backward_frac_matmul"] = out["backward"]["GFLOPs"] / sw["GFLOPs"]
    return out


# ---------------------------------------------------------------------------------------------------- report

def table(res: dict) -> str:
    lines = ["| model | what | seconds | GFLOP | achieved GFLOP/s | matmul GFLOP/s at its shapes | ratio |",
             "|---|---|---|---|---|---|---|"]
    t = res.get("tiny")
    if t:
        mm = t["matmul_GFLOPs"]
        name = f"tiny SD3 (shapes_default), epoch {t['measured_epoch']} of {t['epochs']}"
        lines.append(f"| {name} | {t['forwards']} forwards ({t['forward_rows']} rows): "
                     f"{100 * t['forward_share']:.0f} % of the epoch's {t['epoch_wall_s']:.1f} s | "
                     f"{t['forward_s']:.2f} | {t['forward_flops'] / 1e9:.1f} | {t['forward_GFLOPs']:.2f} | "
                     f"{mm:.2f} | {t['forward_frac_matmul']:.2f} |")
        lines.append(f"| {name} | {t['backwards']} backwards ({t['backward_rows']} rows): "
                     f"{100 * t['backward_share']:.0f} % of the epoch | {t['backward_s']:.2f} | "
                     f"{t['backward_flops'] / 1e9:.1f} | {t['backward_GFLOPs']:.2f} | {mm:.2f} | "
                     f"{t['backward_frac_matmul']:.2f} |")
    s = res.get("sd35m")
    if s:
        mm = s["matmul_GFLOPs"]
        name = f"SD3.5-M size ({s['layers']} blocks), 256 px, {s['tokens']} tokens, LoRA r {s['lora_r']}"
        for key, what in (("rollout_forward", "rollout forward (CFG, no grad)"),
                          ("train_forward", "training forward (cond row, grad)"), ("backward", "its backward")):
            r = s[key]
            sec = f"{r['s']:.1f}" + (f" ({r['s'] * s['scale_to_24_blocks']:.0f} at 24 blocks)"
                                     if s["layers"] != 24 else "")
            lines.append(f"| {name} | {what}, {r['rows']} row(s) | {sec} | {r['GFLOP']:,.0f} | {r['GFLOPs']:.2f} | "
                         f"{mm:.2f} | {r['GFLOPs'] / mm:.2f} |")
    lines.append("")
    lines.append("| model | dominant GEMM (rows x in -> out) | share of Linear FLOPs | GFLOP/s alone |")
    lines.append("|---|---|---|---|")
    for part in ("tiny", "sd35m"):
        if part in res:
            for sh in res[part]["top_shapes"][:4]:
                lines.append(f"| {part} | {sh['rows']} x {sh['in']} -> {sh['out']} | {100 * sh['flop_share']:.0f} % | "
                             f"{sh['GFLOPs']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["tiny", "sd35m", "both"], default="both")
    ap.add_argument("--epochs", type=int, default=2, help="tiny: epochs trained (the last one is reported)")
    ap.add_argument("--layers", type=int, default=24, help="sd35m: transformer blocks (24 = SD3.5-Medium)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    res: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}
    try:
        res["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=20).stdout.strip()
    except Exception:
        res["commit"] = None
    if a.part in ("tiny", "both"):
        res["tiny"] = part_tiny(a.epochs)
        print(f"limit: tiny done ({res['tiny']['epoch_wall_s']:.1f} s epoch)", flush=True)
    if a.part in ("sd35m", "both"):
        res["sd35m"] = part_sd35m(a.layers)
        print(f"limit: sd35m done ({res['sd35m']['seconds']['total']:.0f} s)", flush=True)
    tab = table(res)
    res["table"] = tab
    print(tab)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
