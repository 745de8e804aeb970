"""Peak memory of a rollout step and of a training micro-step, measured, next to what `densegrpo plan` predicts.

    python bench/memory_vs_plan.py [--resolution 256] [--layers 24] [--out FILE.json]

The model: an SD3.5-Medium-sized SD3Transformer2DModel (tests/data/sd35m's published config, random weights, built
by bench/gpu_check.py's build_model) with the recipe's LoRA (r 32), fp32 on the CPU, one thread; the settings are
configs/recipes/sd35m_flow_grpo.yaml with model.resolution, model.dtype=float32, sampling.sample_batch=1,
train.micro_batch=1, train.beta_kl=0 (no reference forward). --layers N < 24 keeps the first N blocks (and the
same share of dual-attention blocks): the plan is then made for that depth too.

Each measurement runs in a fresh subprocess (so peaks do not mix): the model, LoRA and inputs are built, freed heap
is handed back (malloc_trim), the baseline is the process's resident set (VmRSS), the kernel's peak-RSS counter is
reset (`/proc/self/clear_refs` 5; getrusage's ru_maxrss reads the same counter), then one step runs and the peak
is VmHWM. Figure = peak - baseline:
  rollout   one no-grad guided forward of the rollout batch (sample_batch 1 with CFG: one 2-row forward), the
            trainer's GuidedVelocity; against plan's "rollout peak"
  train     one micro-step as the trainer runs it with train.cfg_grad=cond: the unconditional row as a no-grad
            forward, the conditional row with grad through LoRA, sde_logprob + grpo_loss, backward (no optimizer
            step); against plan's "activations" + "LoRA gradients" (what the step allocates on top of the weights)
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import resource
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

RECIPE = os.path.join(ROOT, "configs", "recipes", "sd35m_flow_grpo.yaml")
SD35M = os.path.join(ROOT, "tests", "data", "sd35m")


# ------------------------------------------------------------------------------------ the shared SD3.5-M setup

def sd35m_settings(resolution: int = 256, layers: int = 24, work: str | None = None) -> dict:
    """The recipe's config for the measured settings, the transformer config (the published one, or its first
    `layers` blocks written into a folder under `work`), the folder plan reads, and plan(cfg, world=1) for it."""
    from densegrpo_fast.config import load_config
    from densegrpo_fast.plan import plan
    with open(os.path.join(SD35M, "transformer", "config.json")) as fh:
        tcfg = json.load(fh)
    folder = SD35M
    full = tcfg["num_layers"]
    if layers != full:
        n_dual = round(len(tcfg.get("dual_attention_layers") or []) * layers / full)
        tcfg = dict(tcfg, num_layers=layers, dual_attention_layers=list(range(n_dual)))
        folder = os.path.join(work or tempfile.mkdtemp(prefix="sd35m_"), f"sd35m_{layers}_blocks")
        os.makedirs(os.path.join(folder, "transformer"), exist_ok=True)
        with open(os.path.join(folder, "transformer", "config.json"), "w") as fh:
            json.dump(tcfg, fh)
        with open(os.path.join(SD35M, "model_index.json")) as src, \
                open(os.path.join(folder, "model_index.json"), "w") as dst:
            dst.write(src.read())
    cfg = load_config(RECIPE, [f"model.path={folder}", f"model.resolution={resolution}", "model.dtype=float32",
                               "sampling.sample_batch=1", "train.micro_batch=1", "train.beta_kl=0"])
    p = plan(cfg, world=1)
    text_tokens = p["tokens"] - (p["latent"] // tcfg["patch_size"]) ** 2
    return {"cfg": cfg, "tcfg": tcfg, "folder": folder, "plan": p, "latent": p["latent"],
            "text_tokens": text_tokens, "layers": layers, "resolution": resolution}


def build_sd35m(st: dict) -> dict:
    """bench/gpu_check.py's build_model for these settings (random weights, fp32, CPU, the recipe's LoRA), plus
    the step inputs: z, z', the step index, sigmas and noise levels."""
    import gpu_check
    from densegrpo_fast.rollout.schedule import flow_sigmas, uniform_noise_levels
    rep = {"_cfg": st["cfg"], "_model_cfg": st["tcfg"], "_text_tokens": st["text_tokens"]}
    m = gpu_check.build_model(gpu_check.Sizes(cpu=True), rep)
    sc = st["cfg"].sampling
    B, lat = sc.sample_batch, st["latent"]
    g = torch.Generator().manual_seed(2)
    m["z"] = torch.randn(B, st["tcfg"]["in_channels"], lat, lat, generator=g)
    m["zn"] = m["z"] + 0.1 * torch.randn(m["z"].shape, generator=g)
    m["k"] = torch.full((B,), 2, dtype=torch.long)
    m["sigmas"] = flow_sigmas(sc.steps, sc.shift)
    m["levels"] = uniform_noise_levels(sc.steps, sc.noise_level)
    return m


def rollout_step(st: dict, m: dict) -> torch.Tensor:
    """One no-grad guided forward of the rollout batch (the trainer's GuidedVelocity; CFG: one [uncond; cond]
    batched forward)."""
    from densegrpo_fast.rollout.sampler import GuidedVelocity
    with torch.no_grad():
        return GuidedVelocity(m["transformer"], st["cfg"].sampling.guidance, m["family"])(
            m["z"], m["sigmas"][m["k"]], m["cond"])


def train_step(st: dict, m: dict) -> float:
    """One micro-step as Trainer._micro_batch_logprob / _train run it with train.cfg_grad=cond and beta_kl 0:
    policy velocity (no-grad uncond row, cond row with grad through LoRA), fused log-prob, GRPO loss, backward."""
    from densegrpo_fast import ops
    from densegrpo_fast.rollout.sampler import GuidedVelocity
    cfg = st["cfg"]
    sc, tc = cfg.sampling, cfg.train
    tr = m["transformer"]
    tr.train()
    z, k = m["z"], m["k"]
    v = GuidedVelocity(tr, sc.guidance, m["family"], grad_uncond=tc.cfg_grad == "both")(z, m["sigmas"][k], m["cond"])
    lp, kl = ops.sde_logprob(z, v, m["zn"], m["sigmas"], m["levels"], k, None, sc.variant, sc.logprob_reduction,
                             sc.cps_logprob)
    old = lp.detach() - 1e-3
    adv = torch.ones_like(old)
    loss, _, _ = ops.grpo_loss(lp, old, adv, torch.ones_like(old), tc.clip_range, kl, tc.beta_kl)
    loss.backward()
    return float(loss)


# ------------------------------------------------------------------------------------ one measurement (child)

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.M).group(1))


def tensor_peak(fn) -> int:
    """Peak bytes of live tensors allocated while fn runs (torch.profiler's allocation events: the CPU allocator's
    running total), i.e. what a caching allocator would have to hold at least, without the C allocator's slack."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    ev = []

    def walk(e):
        if e.tag == _EventType.Allocation:
            ev.append((e.start_time_ns, e.extra_fields.alloc_size))
        for c in e.children:
            walk(c)
    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    ev.sort()
    live = peak = 0
    for _, n in ev:
        live += n
        peak = max(peak, live)
    return int(peak)


def measure(what: str, resolution: int, layers: int, tensors: bool = True) -> dict:
    torch.set_num_threads(1)
    st = sd35m_settings(resolution, layers)
    t0 = time.perf_counter()
    m = build_sd35m(st)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() * p.element_size() for p in m["transformer"].parameters())
    buffers = sum(b.numel() * b.element_size() for b in m["transformer"].buffers())
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as fh:   # reset the peak-RSS counter (VmHWM, ru_maxrss) to now
        fh.write("5")
    hwm0 = _status_kib("VmHWM") * 1024
    t0 = time.perf_counter()
    if what == "rollout":
        rollout_step(st, m)
    else:
        train_step(st, m)
    step_s = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    lora_grads = sum(p.grad.numel() * p.grad.element_size() for p in m["trainable"] if p.grad is not None)
    rss_after = _status_kib("VmRSS") * 1024
    tpeak = None
    if tensors:  # the same step again, under the profiler, after the RSS figures are read
        for p in m["trainable"]:
            p.grad = None
        tpeak = tensor_peak(lambda: rollout_step(st, m) if what == "rollout" else train_step(st, m))
    return {"what": what, "tensor_peak": tpeak, "baseline_rss": base, "hwm_after_reset": hwm0, "peak_rss": peak,
            "ru_maxrss": maxrss,
            "increase": peak - base, "rss_after": rss_after, "step_s": step_s,
            "build_s": build_s, "transformer_param_bytes": params, "transformer_buffer_bytes": buffers,
            "lora_grad_bytes": lora_grads, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------ the report (parent)

def _gib(x: float) -> str:
    return f"{x / 2 ** 30:.3f} GiB"


ALLOCATORS = {
    # glibc with a fixed mmap threshold: every allocation >= 128 KiB (all activations here) is its own mapping,
    # unmapped when freed, so the resident set follows the live memory (what plan estimates; a GPU's caching
    # allocator holds that plus its own slack)
    "fixed": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    # glibc as it comes: its dynamic threshold (up to 32 MiB) moves freed tensors into the heap, which keeps them
    "default": {},
}


def compare(st: dict, meas: dict) -> dict:
    """plan's items against the measured increase with the fixed mmap threshold (the default allocator's beside)."""
    mem = st["plan"]["memory"]
    roll_key = next(k for k in mem if k.startswith("rollout peak"))
    act_key = next(k for k in mem if k.startswith("activations"))
    pred = {"rollout": mem[roll_key], "train": mem[act_key] + mem["LoRA gradients"]}
    rows = {}
    for what in ("rollout", "train"):
        fx, df = meas.get(f"{what}/fixed"), meas.get(f"{what}/default")
        if fx is None and df is None:
            continue
        measured = (fx or df)["increase"]
        rows[what] = {"measured": measured, "measured_with": "fixed" if fx else "default", "plan": pred[what],
                      "plan_over_measured": pred[what] / measured,
                      "tensor_peak": (fx or df).get("tensor_peak"),
                      "default_allocator": df["increase"] if df else None, "step_s": (fx or df)["step_s"]}
    return {"plan_items": {"rollout": roll_key, "train": [act_key, "LoRA gradients"]}, "rows": rows}


def table(res: dict) -> str:
    st, c, meas = res["settings"], res["comparison"], res["measured"]
    any_m = next(iter(meas.values()))
    lines = [f"SD3.5-M-sized transformer ({st['layers']} blocks, random weights), {st['resolution']} px "
             f"({st['tokens']} tokens), LoRA r {st['lora_r']}, fp32, CPU, {any_m['threads']} thread(s); baseline "
             f"(model + LoRA + inputs loaded) RSS {_gib(any_m['baseline_rss'])}", "",
             "| step | peak RSS - baseline, fixed mmap threshold | live-tensor peak (profiler) | peak RSS - baseline, "
             "glibc default | plan | plan / measured (fixed) | step s |", "|---|---|---|---|---|---|---|"]
    names = {"rollout": f"rollout: no-grad CFG forward, {st['rollout_rows']} rows",
             "train": "training micro-step (cfg_grad=cond: 1 row with grad + backward)"}
    for what, r in c["rows"].items():
        g = lambda x: _gib(x) if x else "-"  # noqa: E731
        fixed = _gib(r["measured"]) if r["measured_with"] == "fixed" else "-"
        lines.append(f"| {names[what]} | {fixed} | {g(r['tensor_peak'])} | {g(r['default_allocator'])} | "
                     f"{_gib(r['plan'])} | {r['plan_over_measured']:.2f} | {r['step_s']:.0f} |")
    return "\n".join(lines)


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except Exception:
        return None


def run_child(what: str, alloc: str, a) -> dict:
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(ALLOCATORS[alloc])
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", what, "--resolution", str(a.resolution),
           "--layers", str(a.layers)]
    if alloc != "fixed" or a.no_tensor_peak:  # the live-tensor peak is taken once, in the fixed-threshold child
        cmd.append("--no-tensor-peak")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode or line is None:
        raise RuntimeError(f"{what}/{alloc} failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    out = json.loads(line[len("RESULT "):])
    out.update(allocator=alloc, allocator_env=ALLOCATORS[alloc], subprocess_s=time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--layers", type=int, default=24, help="transformer blocks (24 = SD3.5-Medium)")
    ap.add_argument("--only", choices=["rollout", "train"], action="append", help="measure only this (repeatable)")
    ap.add_argument("--allocator", choices=list(ALLOCATORS), action="append",
                    help="glibc setting(s) to measure with (default: both)")
    ap.add_argument("--measure", choices=["rollout", "train"], help=argparse.SUPPRESS)  # the child's job
    ap.add_argument("--no-tensor-peak", action="store_true", help="skip the profiled second step (live tensors)")
    ap.add_argument("--replan", default=None, metavar="JSON",
                    help="no new measurement: put the measured figures of an earlier --out file next to what the "
                         "current plan.py predicts (its settings are the file's)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    if a.replan:
        with open(a.replan) as fh:
            old = json.load(fh)
        a.resolution, a.layers = old["settings"]["resolution"], old["settings"]["layers"]
    if a.measure:
        print("RESULT " + json.dumps(measure(a.measure, a.resolution, a.layers, not a.no_tensor_peak)), flush=True)
        return 0
    torch.set_num_threads(1)
    st = sd35m_settings(a.resolution, a.layers)
    meas = old["measured"] if a.replan else {}
    for what in [] if a.replan else a.only or ["rollout", "train"]:
        for alloc in a.allocator or list(ALLOCATORS):
            m = meas[f"{what}/{alloc}"] = run_child(what, alloc, a)
            tp = f", live tensors {_gib(m['tensor_peak'])}" if m.get("tensor_peak") else ""
            print(f"memory_vs_plan: {what} ({alloc} glibc): +{_gib(m['increase'])} over {_gib(m['baseline_rss'])}"
                  f"{tp} ({m['step_s']:.0f} s step, {m['subprocess_s']:.0f} s in all)", flush=True)
    p = st["plan"]
    res = {"settings": {"resolution": a.resolution, "layers": a.layers, "tokens": p["tokens"], "hidden": p["hidden"],
                        "blocks": p["blocks"], "lora_r": st["cfg"].model.lora.r, "dtype": "float32",
                        "rollout_rows": st["cfg"].sampling.sample_batch * 2, "recipe": os.path.relpath(RECIPE, ROOT),
                        "memory_method": "VmHWM after /proc/self/clear_refs 5 (= getrusage ru_maxrss), minus VmRSS "
                                         "after gc + malloc_trim; one fresh subprocess per measurement; live-tensor "
                                         "peak from torch.profiler allocation events of a second, profiled step"},
           "measured": meas, "plan_memory": p["memory"], "comparison": compare(st, meas),
           "torch": torch.__version__}
    if a.replan:
        res["replanned_from"] = {"file": a.replan, "commit": old.get("commit"), "plan_memory": old["plan_memory"]}
    res["commit"] = _commit()
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
