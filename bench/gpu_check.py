"""The GPU check in one process: `bash bench/gpu_check.sh [--cpu] [OUT]` (docs/gpu.md). Figures go to
OUT/gpu_check.json (every number, with device, versions and commit), OUT/table.md (printed last) and
OUT/measured.json (the ops backend rule's entry for this device, see densegrpo_fast/ops).

Phases, each recorded on its own (a failing phase is written to "errors" and the others still run):
  env         device, torch / Triton / CUDA versions, commit, ops backends, the wheels taken from .whl/
  tests       the GPU tests (pytest): ops vs the fp64 reference, CUDA-graph replay == eager with
              set_sync_debug_mode("error") on SD3 and FLUX tiny models; --cpu only collects them (imports checked)
  collective  two ranks through the trainer's init_distributed and its collectives: NCCL (needs 2 GPUs; skipped
              with one), gloo with --cpu; all-reduce bus bandwidth
  ops         copy bandwidth, bf16 matmul rate, the fused ops' GB/s per backend; the triton-vs-cuda decision
  rollout     an SD3.5-Medium-sized transformer (tests/data/sd35m config, random weights, bf16, 512 px) with LoRA:
              10-step CFG SDE rollout eager vs through GraphedVelocity (what training samples with), no host sync
              in a replayed rollout, achieved TFLOP/s (FLOPs per forward counted on the meta device from the config)
  train       training micro-steps (policy + reference forward, fused log-prob, GRPO loss, backward, AdamW), TFLOP/s,
              ratio_dev_first (rollout log-probs vs the training layout before any update)
  memory      peak GPU memory of rollout and training next to `densegrpo plan`'s prediction for the same settings
--cpu: a tiny transformer, a few iterations, no CUDA-only parts (graphs fall back to eager, no peak memory); the
same functions otherwise, so the suite (tests/test_gpu_check.py) catches a broken name or import here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)
import gpu_bench  # noqa: E402
from flops import forward_flops  # noqa: E402,F401  (FLOPs per forward from the config)
import gpu_wheels  # noqa: E402

RECIPE = os.path.join(ROOT, "configs", "recipes", "sd35m_flow_grpo.yaml")
GPU_TESTS = ["tests/test_cuda_sources.py", "tests/test_sde_step.py", "tests/test_sde_logprob.py",
             "tests/test_grpo_loss.py", "tests/test_graphs.py",
             "tests/test_flux.py::test_graph_replay_equals_eager_on_flux"]
TINY_TRANSFORMER = dict(_class_name="SD3Transformer2DModel", sample_size=8, patch_size=2, in_channels=16,
                        num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                        caption_projection_dim=16, pooled_projection_dim=16, out_channels=16, pos_embed_max_size=16,
                        dual_attention_layers=[0], qk_norm="rms_norm")


class Sizes:
    """What each phase runs: the recipe's settings on the GPU, tiny ones with --cpu."""

    def __init__(self, cpu: bool):
        self.cpu = cpu
        self.device = torch.device("cpu" if cpu else "cuda")
        self.copy_numel = 2 ** 20 if cpu else 256 * 2 ** 20               # fp32: 4 MiB / 1 GiB
        self.matmul_n = 128 if cpu else 8192
        self.op_iters = 3 if cpu else 50
        self.rollout_iters = 1 if cpu else 3
        self.train_iters = 2 if cpu else 5
        self.overrides = (["model.resolution=64", "sampling.sample_batch=2", "train.micro_batch=2",
                           "model.max_sequence_length=8"] if cpu else [])
        self.op_batches = (2, 3) if cpu else (8, 64)
        self.allreduce_bytes = 2 ** 20 if cpu else 256 * 2 ** 20


# ------------------------------------------------------------------------------------------------ helpers

def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device):
    """Peak allocated bytes since the last peak_reset (None on the CPU: no per-phase figure there)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def commit() -> dict:
    out = {}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                       timeout=20, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=20).stdout.strip()
        out["dirty"] = bool(dirty)
    except Exception:
        path = os.path.join(ROOT, ".whl", "commit.txt")   # no .git on the device copy: the bundle's record
        out["commit"] = open(path).read().strip() if os.path.isfile(path) else "unknown"
        out["commit_source"] = ".whl/commit.txt (when `make gpu-bundle` ran)" if os.path.isfile(path) else None
    return out


# ------------------------------------------------------------------------------------------------- phases

def phase_env(s: Sizes, rep: dict) -> dict:
    from importlib.metadata import version
    from densegrpo_fast import ops
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpu": platform.processor() or platform.machine(), "mode": "cpu" if s.cpu else "gpu", **commit()}
    for pkg in ("triton", "diffusers", "transformers", "peft", "deepspeed"):
        try:
            env[pkg] = version(pkg)
        except Exception:
            env[pkg] = None
    if s.device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                   device_memory_bytes=int(p.total_memory), capability=f"{p.major}.{p.minor}",
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(device="cpu", device_count=0)
    env["ops_backends"] = ops.available_backends()
    env["ops_load_errors"] = {b: ops.unavailable_reason(b) for b in ("cpp", "triton", "cuda")
                              if ops.unavailable_reason(b)}
    env["ops_build_info"] = ops.build_info()
    whl = os.path.join(ROOT, ".whl")
    sel = gpu_wheels.select(whl) if os.path.isdir(whl) else {"install": [], "keep": {}, "unmet": []}
    env["wheels"] = {"dir_present": os.path.isdir(whl), "would_install": [os.path.basename(p) for p in sel["install"]],
                     "kept_from_image": sel["keep"], "unmet": sel["unmet"]}
    return env


def phase_tests(s: Sizes, rep: dict) -> dict:
    """pytest on GPU_TESTS in a subprocess (--cpu: collect only). -> counts per outcome, seconds, rc."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS]
    cmd += ["--collect-only"] if s.cpu else ["-rfE"]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120 if s.cpu else 300)
    out = {"command": " ".join(cmd[1:]), "rc": r.returncode, "seconds": time.perf_counter() - t}
    text = r.stdout + r.stderr
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|tests? collected)",
                              text):
        out["collected" if what.endswith("collected") else what.rstrip("s")] = int(n)
    if "collected" not in out and s.cpu:  # -qq --collect-only: one "file: count" line per file
        out["collected"] = sum(int(n) for n in re.findall(r"^\S+\.py: (\d+)$", text, re.M))
    out["failures"] = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))][:30]
    if r.returncode not in (0,):
        out["tail"] = text[-3000:]
        raise RuntimeError(f"pytest rc={r.returncode}: {'; '.join(out['failures'][:5]) or text[-500:]}")
    return out


def _collective_rank(rank: int, world: int, port: int, nbytes: int, q):
    """One rank of the collective check: the trainer's init_distributed (DeepSpeed, nccl on CUDA) and collectives."""
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        from densegrpo_fast.train import distributed as D
        r, w, dev = D.init_distributed(timeout_s=120)
        t = D.all_reduce_sum(torch.full((4,), float(r + 1), device=dev))
        ok = (t.cpu().tolist() == [w * (w + 1) / 2] * 4 and D.agree_max(float(r), dev) == w - 1
              and D.all_reduce_sum_int(1, dev) == w and D.all_gather_cat(torch.tensor([r], device=dev)).numel() == w)
        x = torch.randn(nbytes // 4, device=dev)
        for _ in range(3):
            D.all_reduce_sum(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            D.all_reduce_sum(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / 5
        q.put({"rank": r, "ok": bool(ok), "backend": torch.distributed.get_backend(), "allreduce_s": sec})
        torch.distributed.destroy_process_group()
    except Exception as exc:
        q.put({"rank": rank, "ok": False, "error": f"{type(exc).__name__}: {exc}"})


def phase_collective(s: Sizes, rep: dict) -> dict:
    if s.device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU (two needed)"}
    import torch.multiprocessing as mp
    from densegrpo_fast.train.distributed import _free_port
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_collective_rank, args=(r, 2, port, s.allreduce_bytes, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = [q.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    res.sort(key=lambda d: d["rank"])
    if not all(d["ok"] for d in res):
        raise RuntimeError(f"collective check failed: {res}")
    sec = max(d["allreduce_s"] for d in res)
    # ring all-reduce: each rank sends and receives 2 (n-1)/n of the buffer
    return {"ranks": res, "backend": res[0]["backend"], "allreduce_bytes": s.allreduce_bytes, "allreduce_s": sec,
            "allreduce_bus_GBps": 2 * 0.5 * s.allreduce_bytes / sec / 1e9}


def phase_ops(s: Sizes, rep: dict) -> dict:
    from densegrpo_fast import ops
    dev = s.device
    copy = gpu_bench.copy_bandwidth(dev, s.copy_numel, iters=5 if s.cpu else 50)
    mm = gpu_bench.matmul_rate(dev, s.matmul_n, torch.bfloat16, iters=3 if s.cpu else 20)
    tcfg = rep["_model_cfg"]
    latent = (tcfg["in_channels"], rep["_latent"], rep["_latent"])
    backends = gpu_bench.op_backends(dev)
    cases = gpu_bench.op_cases(dev, latent, s.op_batches, (torch.float32, torch.bfloat16), backends, copy,
                               iters=s.op_iters)
    times: dict = {}
    for c in cases:
        times.setdefault(c["backend"], {})[f"{c['op']} B={c['batch']} {c['dtype']}"] = c["median_s"]
    decision = ops.choose_cuda_backend(times)
    out = {"copy_GBps": copy, "matmul_bf16_TFLOPs": mm, "matmul_n": s.matmul_n, "cases": cases,
           "backend_decision": decision, "auto_resolves_to": ops.resolve_backend(dev)}
    if dev.type == "cuda":
        entry = {**decision, "torch": torch.__version__, "commit": rep["env"].get("commit"),
                 "rule": f"cuda when its time is <= {ops.CUDA_CHOICE_MARGIN} x triton's (geometric mean)"}
        out["measured_json"] = {torch.cuda.get_device_name(0): entry}
    return out


def build_model(s: Sizes, rep: dict):
    """The transformer (random weights, model dtype, on the device) with the recipe's LoRA, the config, and
    random text conditioning of the recipe's shapes. -> dict of what rollout and train use."""
    import diffusers
    from densegrpo_fast.models.base import Cond
    from densegrpo_fast.models.lora import add_lora
    from densegrpo_fast.models.sd3 import SD3Family
    cfg = rep["_cfg"]
    tcfg = rep["_model_cfg"]
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.model.dtype]
    torch.manual_seed(0)
    with torch.device(s.device):  # parameters are created and initialised on the device
        tr = getattr(diffusers, tcfg["_class_name"]).from_config({k: v for k, v in tcfg.items()
                                                                  if not k.startswith("_")})
    tr = tr.to(dt).eval()
    trainable = add_lora(tr, cfg.model.lora, SD3Family())
    with torch.no_grad():  # a non-zero LoRA up-projection, so the policy differs from the reference
        for p in trainable:
            p.normal_(0.0, 0.01)
    B, S = cfg.sampling.sample_batch, rep["_text_tokens"]
    g = torch.Generator(device=s.device).manual_seed(1)
    shapes = {"embeds": (B, S, tcfg["joint_attention_dim"]), "pooled": (B, tcfg["pooled_projection_dim"])}
    shapes.update({"neg_" + k: v for k, v in shapes.items()})
    cond = Cond(**{k: torch.randn(*v, generator=g, device=s.device).to(dt) for k, v in shapes.items()})
    return {"transformer": tr, "trainable": trainable, "cond": cond, "dtype": dt, "family": SD3Family()}


def phase_rollout(s: Sizes, rep: dict) -> dict:
    from densegrpo_fast.rollout.graphs import GraphedVelocity
    from densegrpo_fast.rollout.sampler import GuidedVelocity, sde_rollout
    from densegrpo_fast.rollout.schedule import flow_sigmas, uniform_noise_levels
    cfg, dev = rep["_cfg"], s.device
    sc = cfg.sampling
    m = rep["_model"] = build_model(s, rep)
    tr, cond = m["transformer"], m["cond"]
    B, T = sc.sample_batch, sc.steps
    sig, lv = flow_sigmas(T, sc.shift, device=dev), uniform_noise_levels(T, sc.noise_level, dev)
    z0 = torch.randn(B, rep["_model_cfg"]["in_channels"], rep["_latent"], rep["_latent"],
                     generator=torch.Generator(device=dev).manual_seed(2), device=dev)
    g = torch.Generator(device=dev)
    kw = dict(variant=sc.variant, reduction=sc.logprob_reduction, cps_logprob=sc.cps_logprob)

    def run(vel, seed=3):
        return sde_rollout(vel, cond, z0, sig, lv, g.manual_seed(seed), **kw)

    eager_v = GuidedVelocity(tr, sc.guidance, m["family"])
    graph_v = GraphedVelocity(GuidedVelocity(tr, sc.guidance, m["family"]), enabled=sc.cuda_graphs)  # the trainer's
    out = {"batch": B, "steps": T, "guidance": sc.guidance, "rows_per_forward": B * (2 if eager_v.cfg else 1),
           "dtype": str(m["dtype"])[6:], "resolution": rep["plan"]["resolution"], "tokens": rep["plan"]["tokens"]}
    flops_row = forward_flops(rep["_model_cfg"], rep["_latent"], rep["_text_tokens"])
    out["forward_GFLOP_per_row"] = flops_row / 1e9
    out["params_transformer"] = rep["plan"]["params"]["transformer"]
    with torch.no_grad():
        peak_reset(dev)
        out["eager_s"] = gpu_bench.timed(lambda: run(eager_v), dev, s.rollout_iters, 1)
        out["peak_bytes_eager"] = peak_bytes(dev)
        ref = run(eager_v, 4)
        peak_reset(dev)
        t0 = time.perf_counter()
        first = run(graph_v, 4)                                   # two eager warm-up steps, capture, replays
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out["graph_first_rollout_s"] = time.perf_counter() - t0
        out["graphs_captured"] = len(graph_v.graphs)
        out["graph_s"] = gpu_bench.timed(lambda: run(graph_v), dev, s.rollout_iters, 1)
        out["peak_bytes_graph"] = peak_bytes(dev)
        if dev.type == "cuda":  # a replayed rollout must not wait on the host (a finding, not a stop)
            torch.cuda.set_sync_debug_mode("error")
            try:
                run(graph_v, 4)
                out["replay_without_host_sync"] = True
            except RuntimeError as exc:
                out["replay_without_host_sync"] = False
                rep["errors"]["rollout host sync"] = f"a replayed rollout synchronised: {exc}"[:500]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        again = run(graph_v, 4)
        out["max_abs_diff_latents"] = max((first.latents - ref.latents).abs().max().item(),
                                          (again.latents - ref.latents).abs().max().item())
        out["max_abs_diff_log_probs"] = max((first.log_probs - ref.log_probs).abs().max().item(),
                                            (again.log_probs - ref.log_probs).abs().max().item())
    out["graph_speedup"] = out["eager_s"] / out["graph_s"]
    flops = flops_row * out["rows_per_forward"] * T
    out["TFLOP_per_rollout"] = flops / 1e12
    out["eager_TFLOPs"] = flops / out["eager_s"] / 1e12
    out["graph_TFLOPs"] = flops / out["graph_s"] / 1e12
    mm = rep.get("ops", {}).get("matmul_bf16_TFLOPs")
    if mm:
        out["graph_frac_matmul_rate"] = out["graph_TFLOPs"] / mm
    m["trajectory"], m["sigmas"], m["levels"] = again, sig, lv
    return out


def phase_train(s: Sizes, rep: dict) -> dict:
    """Training micro-steps as the trainer runs them (its _micro_batch_logprob and _train, without the DeepSpeed
    engine: plain AdamW on the LoRA weights)."""
    from torch.utils.flop_counter import FlopCounterMode
    from densegrpo_fast import ops
    from densegrpo_fast.models.lora import adapter_disabled
    from densegrpo_fast.rollout.sampler import GuidedVelocity
    cfg, dev, m = rep["_cfg"], s.device, rep["_model"]
    tc, sc = cfg.train, cfg.sampling
    tr, traj, sig, lv = m["transformer"], m["trajectory"], m["sigmas"], m["levels"]
    tr.train()
    opt = torch.optim.AdamW(m["trainable"], lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    B, T = traj.log_probs.shape
    M = tc.micro_batch
    g = torch.Generator().manual_seed(5)
    n_train = max(1, int(math.floor(tc.timestep_fraction * T)))
    pairs = torch.stack([torch.randint(0, B, (M,), generator=g), torch.randint(0, n_train, (M,), generator=g)], 1)
    i, k = pairs[:, 0].to(dev), pairs[:, 1].to(dev)
    z, zn = traj.latents[i, k], traj.latents[i, k + 1]
    cond = m["cond"].index(i)
    t = sig[k]
    old = traj.log_probs[i, k]
    adv = torch.randn(M, generator=g).to(dev)
    w = torch.ones(M, device=dev)

    def micro_step():
        v = GuidedVelocity(tr, sc.guidance, m["family"], grad_uncond=tc.cfg_grad == "both")(z, t, cond)
        v_ref = None
        if tc.beta_kl > 0:
            with torch.no_grad(), adapter_disabled(tr):
                v_ref = GuidedVelocity(tr, sc.guidance, m["family"])(z, t, cond)
        lp, kl = ops.sde_logprob(z, v, zn, sig, lv, k, v_ref, sc.variant, sc.logprob_reduction, sc.cps_logprob)
        loss, _, _ = ops.grpo_loss(lp, old, adv, w, tc.clip_range, kl, tc.beta_kl)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m["trainable"], tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return lp.detach(), loss.detach()

    peak_reset(dev)
    with FlopCounterMode(display=False) as fc:                   # untimed first step: counts FLOPs, before updates
        lp0, loss0 = micro_step()
    flops = int(fc.get_total_flops())
    out = {"micro_batch": M, "cfg_grad": tc.cfg_grad, "beta_kl": tc.beta_kl, "optimizer": "torch AdamW (no DeepSpeed)",
           "TFLOP_per_micro_step": flops / 1e12, "loss_first": float(loss0),
           "ratio_dev_first": float((lp0.double() - old.double()).exp().sub(1.0).abs().max())}
    out["step_s"] = gpu_bench.timed(micro_step, dev, s.train_iters, 1)
    out["peak_bytes"] = peak_bytes(dev)
    out["TFLOPs"] = flops / out["step_s"] / 1e12
    mm = rep.get("ops", {}).get("matmul_bf16_TFLOPs")
    if mm:
        out["frac_matmul_rate"] = out["TFLOPs"] / mm
    return out


def phase_memory(s: Sizes, rep: dict) -> dict:
    """Measured peaks next to `densegrpo plan` (world 1, the recipe's ZeRO stage): the rollout phase against weights
    + LoRA + rollout peak + text on the device; the training phase against every item but the rollout peak."""
    mem = rep["plan"]["memory"]
    roll_key = next(k for k in mem if k.startswith("rollout peak"))
    keys_roll = ["weights (transformer)", "LoRA weights", roll_key, "text embeddings on the device (one batch)"]
    pred_roll = sum(mem[k] for k in keys_roll)
    pred_train = sum(v for k, v in mem.items() if k != roll_key)
    r, t = rep.get("rollout", {}), rep.get("train", {})
    out = {"plan_total_bytes": sum(mem.values()), "plan_rollout_bytes": pred_roll, "plan_train_bytes": pred_train,
           "rollout_eager_peak_bytes": r.get("peak_bytes_eager"), "rollout_graph_peak_bytes": r.get("peak_bytes_graph"),
           "train_peak_bytes": t.get("peak_bytes"), "plan_items": mem}
    if s.device.type == "cuda" and r.get("peak_bytes_graph") and t.get("peak_bytes"):
        out["rollout_measured_over_plan"] = r["peak_bytes_graph"] / pred_roll
        out["train_measured_over_plan"] = t["peak_bytes"] / pred_train
    return out


# -------------------------------------------------------------------------------------------------- report

def table(rep: dict) -> str:
    gib = lambda b: f"{b / 2 ** 30:.2f} GiB" if finite(b) else "-"
    f = lambda x, fmt: format(x, fmt) if finite(x) else "-"
    e = rep.get("env", {})
    rows = [("device", f"{e.get('device')} x{e.get('device_count')}", f"torch {e.get('torch')}, triton "
             f"{e.get('triton')}, CUDA {e.get('cuda')}, commit {str(e.get('commit'))[:10]}")]
    ts = rep.get("tests", {})
    if ts:
        rows.append(("GPU tests" if e.get("mode") == "gpu" else "GPU tests (collected only)",
                     f"{ts.get('passed', 0)} passed, {ts.get('failed', 0)} failed, {ts.get('skipped', 0)} skipped"
                     if e.get("mode") == "gpu" else f"{ts.get('collected', 0)} collected",
                     f"{f(ts.get('seconds'), '.0f')} s"))
    c = rep.get("collective", {})
    if c:
        rows.append(("2-rank collectives", c.get("skipped") or f"ok ({c.get('backend')})",
                     f"all-reduce bus {f(c.get('allreduce_bus_GBps'), '.2f')} GB/s" if "allreduce_bus_GBps" in c
                     else ""))
    o = rep.get("ops", {})
    if o:
        rows.append(("copy bandwidth", f"{f(o.get('copy_GBps'), '.0f')} GB/s", ""))
        rows.append(("bf16 matmul", f"{f(o.get('matmul_bf16_TFLOPs'), '.1f')} TFLOP/s", f"n = {o.get('matmul_n')}"))
        for cs in o.get("cases", []):
            if cs["backend"] != "torch":
                rows.append((f"{cs['op']} B={cs['batch']} {cs['dtype']} [{cs['backend']}]",
                             f"{cs['GBps']:.1f} GB/s ({cs['frac_copy_bw']:.2f} of copy)",
                             f"{cs['median_s'] * 1e6:.0f} us, x{cs['x_torch']:.1f} vs torch ops"))
        d = o.get("backend_decision", {})
        rows.append(("ops auto (CUDA)", d.get("auto", "-"), f"cuda/triton time {f(d.get('ratio_cuda_over_triton'), '.2f')}"
                     f" over {d.get('cases', 0)} cases"))
    r = rep.get("rollout", {})
    if r:
        what = f"rollout {r.get('steps')} steps B={r.get('batch')} CFG {r.get('dtype')} {r.get('resolution')} px"
        rows.append((what + " eager", f"{f(r.get('eager_s'), '.3f')} s", f"{f(r.get('eager_TFLOPs'), '.1f')} TFLOP/s"))
        rows.append((what + " graphs", f"{f(r.get('graph_s'), '.3f')} s",
                     f"x{f(r.get('graph_speedup'), '.2f')}, {f(r.get('graph_TFLOPs'), '.1f')} TFLOP/s "
                     f"({f(r.get('graph_frac_matmul_rate'), '.2f')} of matmul), max|diff| "
                     f"{f(r.get('max_abs_diff_latents'), '.1e')}"))
    t = rep.get("train", {})
    if t:
        rows.append((f"train micro-step M={t.get('micro_batch')}", f"{f(t.get('step_s'), '.3f')} s",
                     f"{f(t.get('TFLOPs'), '.1f')} TFLOP/s ({f(t.get('frac_matmul_rate'), '.2f')} of matmul), "
                     f"ratio_dev_first {f(t.get('ratio_dev_first'), '.1e')}"))
    mm = rep.get("memory", {})
    if mm:
        rows.append(("peak memory rollout (graphs)", gib(mm.get("rollout_graph_peak_bytes")),
                     f"plan {gib(mm.get('plan_rollout_bytes'))}"))
        rows.append(("peak memory training", gib(mm.get("train_peak_bytes")), f"plan {gib(mm.get('plan_train_bytes'))}"))
    for k, v in rep.get("errors", {}).items():
        rows.append((f"ERROR in {k}", v.strip().splitlines()[-1][:120], ""))
    lines = ["| what | figure | beside it |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=os.path.join(ROOT, "runs", "gpu_check"))
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU, no CUDA-only parts")
    ap.add_argument("--skip", action="append", default=[], help="a phase to leave out (repeatable)")
    a = ap.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu for the CPU mode)", file=sys.stderr)
        return 2
    s = Sizes(a.cpu)
    if a.cpu:  # tiny ops: one thread (OpenMP threads spinning on a shared, busy CPU are up to 100x slower)
        torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "gpu_check.json")
    rep: dict = {"errors": {}, "seconds": {}}
    t_all = time.perf_counter()

    # the settings every phase shares: the recipe, its model config, and densegrpo plan for them
    from densegrpo_fast.config import load_config
    from densegrpo_fast.plan import plan
    if a.cpu:
        folder = tempfile.mkdtemp(prefix="gpu_check_model_")
        os.makedirs(os.path.join(folder, "transformer"))
        with open(os.path.join(folder, "transformer", "config.json"), "w") as fh:
            json.dump(TINY_TRANSFORMER, fh)
    else:
        folder = os.path.join(ROOT, "tests", "data", "sd35m")
    cfg = load_config(RECIPE, [f"model.path={folder}", *s.overrides])
    with open(os.path.join(folder, "transformer", "config.json")) as fh:
        rep["_model_cfg"] = json.load(fh)
    p = plan(cfg, world=1)
    rep["_cfg"], rep["_latent"], rep["_text_tokens"] = cfg, p["latent"], p["tokens"] - (p["latent"] // 2) ** 2
    rep["plan"] = {k: p[k] for k in ("resolution", "latent", "tokens", "hidden", "blocks", "params", "lora_params",
                                     "memory", "zero_stage", "dtype")}
    rep["settings"] = {"recipe": os.path.relpath(RECIPE, ROOT), "overrides": s.overrides, "world": 1}

    def save():
        with open(path, "w") as fh:
            json.dump({k: v for k, v in rep.items() if not k.startswith("_")}, fh, indent=1, default=str)

    phases = [("env", phase_env), ("tests", phase_tests), ("collective", phase_collective), ("ops", phase_ops),
              ("rollout", phase_rollout), ("train", phase_train), ("memory", phase_memory)]
    needs = {"train": "rollout"}
    for name, fn in phases:
        if name in a.skip:
            continue
        if needs.get(name) in rep["errors"]:
            rep["errors"][name] = f"not run: phase {needs[name]} failed"
            continue
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            rep[name] = fn(s, rep)
        except Exception as exc:
            rep["errors"][name] = traceback.format_exc(limit=6)
            print(f"gpu_check: {name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        rep["seconds"][name] = time.perf_counter() - t0
        save()
    measured = rep.get("ops", {}).get("measured_json")
    if measured:
        with open(os.path.join(a.out, "measured.json"), "w") as fh:
            json.dump(measured, fh, indent=1)
    rep["seconds"]["total"] = time.perf_counter() - t_all
    save()
    tab = table(rep)
    with open(os.path.join(a.out, "table.md"), "w") as fh:
        fh.write(tab + "\n")
    print(f"\ngpu_check: {path} ({rep['seconds']['total']:.0f} s)\n{tab}")
    return 1 if rep["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
