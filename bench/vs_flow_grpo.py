"""Throughput side by side with Flow-GRPO's own code, in one process, on one pipeline object.

    python bench/vs_flow_grpo.py --flow-grpo-src DIR [--columns defaults,best] [--phases rollout,train,epoch,dense]
    make bench-vs-flow-grpo FLOW_GRPO_SRC=DIR

DIR is a local checkout of github.com/yifan123/flow_grpo (MIT). Its own functions are imported from there at run
time — `flow_grpo/diffusers_patch/sd3_pipeline_with_logprob.py: pipeline_with_logprob` and
`sd3_sde_with_logprob.py: sde_step_with_logprob` — nothing of theirs is in this repository. Both sides get the same
pipeline (the shipped tiny SD3 on CPU, or `--model DIR`), the same precomputed embeddings (empty-prompt negative,
`--text-slots` T5 slots as their train_sd3.py uses), steps, CFG, noise level, resolution and batch sizes; rounds
alternate (theirs, ours, theirs, ...) and the table reports medians and the spread (min-max) of each side.

Phases
  rollout   their pipeline_with_logprob (denoise + decode) vs our SDE rollout + decode, batch B
  train     one training micro-step on the same LoRA transformer: CFG policy forward, reference forward (adapter
            off, beta > 0), log-prob of the stored transition, clipped-ratio loss + KL, backward, AdamW step. Theirs:
            the loss as train_sd3.py computes it around their sde_step_with_logprob(..., prev_sample=...); ours: the
            fused sde_logprob + grpo_loss the trainer uses
  epoch     rollout + reward (JPEG compressibility in a thread pool on both sides) + training on the same
            trajectories and trained steps
  dense     our DenseGRPO rollout (staircase completions + T+1 decodes and rewards per trajectory) vs their code run
            once per completion point (their step function with noise level 0 from each z_k, one decode each)

Columns (`--columns`, default both, one after the other in the same process, each with its own alternating rounds):
  defaults  what a user gets: our side with the compile mode that `model.compile: auto` picks for
            configs/shapes_default.yaml (`make train`) on this machine now (its epochs and the compile cache's state:
            models.base.resolve_compile)
  best      our side with `--compile` (default: torch.compile "default")
Their side stays eager in both. Each case's network work is counted on both sides (rows through the transformer,
and those with autograd, in one eager pass with a hook), and the table splits the speed-up into their work / ours
and our speed per unit of work (a row forward 1, a row with autograd 3), so a missed target says which it lacks.
The first calls that compile are timed apart and reported as compile seconds. Before timing, the log-probs of both
implementations are compared on the same inputs (fp32, mean reduction; must agree to 1e-5).
The table is printed and appended to bench/results.csv with the device name.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_flow_grpo(src: str):
    """Import their pipeline_with_logprob and sde_step_with_logprob from a local checkout (a clear error otherwise)."""
    need = [os.path.join(src, "flow_grpo", "diffusers_patch", f) for f in
            ("sd3_pipeline_with_logprob.py", "sd3_sde_with_logprob.py")]
    missing = [p for p in need if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"--flow-grpo-src {src!r} is not a Flow-GRPO checkout: missing {', '.join(missing)}")
    sys.path.insert(0, os.path.abspath(src))
    pipe_mod = importlib.import_module("flow_grpo.diffusers_patch.sd3_pipeline_with_logprob")
    sde_mod = importlib.import_module("flow_grpo.diffusers_patch.sd3_sde_with_logprob")
    return pipe_mod.pipeline_with_logprob, sde_mod.sde_step_with_logprob


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


class Setup:
    """One pipeline with LoRA, shared by both sides; embeddings, schedule and our (optionally compiled) network."""

    def __init__(self, a):
        from densegrpo_fast.config import LoraConfig
        from densegrpo_fast.eval import DEFAULT_MODEL
        from densegrpo_fast.models import load_pipeline
        from densegrpo_fast.models.base import DTYPES, models_from_pipe
        from densegrpo_fast.models.lora import add_lora
        from densegrpo_fast.models.sd3 import SD3Family
        from densegrpo_fast.rewards import CombinedReward
        from densegrpo_fast.rollout.schedule import NoiseSchedule
        self.a = a
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = DTYPES[a.dtype]
        self.pipe = load_pipeline(a.model or DEFAULT_MODEL, "sd3", dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.family = SD3Family()
        self.models = models_from_pipe(self.pipe, self.dev, dtype, a.text_slots, self.family, a.resolution)
        self.tr = self.pipe.transformer
        self.trainable = add_lora(self.tr, LoraConfig(r=a.lora_r, alpha=2 * a.lora_r), self.family, seed=0)
        self.ours_tr = self.tr if a.compile == "off" else torch.compile(
            self.tr, mode=None if a.compile == "default" else a.compile, dynamic=None)
        self.res = self.models.resolution
        self.latent_shape = self.models.latent_shape
        self.sched = NoiseSchedule(self.models.sigmas(a.steps, 3.0), a.noise_level, self.dev)
        self.pipe.scheduler.set_timesteps(a.steps, device=self.dev)
        prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
        pe, pp = self.models.text.encode(prompts).tensors()
        ne, npool = self.models.text.encode([""]).tensors()
        self.embeds = {"pos": pe, "pooled": pp, "neg": ne, "neg_pooled": npool}
        self.reward = CombinedReward({"jpeg_compressibility": 1.0}, threads=2)
        self.pool = ThreadPoolExecutor(2)
        self.compile_s: dict = {}

    def cond(self, B):
        from densegrpo_fast.models.base import Cond
        e = self.embeds
        idx = torch.arange(B) % e["pos"].shape[0]
        return Cond(embeds=e["pos"][idx], pooled=e["pooled"][idx], neg_embeds=e["neg"].expand(B, -1, -1),
                    neg_pooled=e["neg_pooled"].expand(B, -1))

    def theirs_embeds(self, B):
        c = self.cond(B)
        return dict(prompt_embeds=c.embeds, pooled_prompt_embeds=c.pooled, negative_prompt_embeds=c.neg_embeds,
                    negative_pooled_prompt_embeds=c.neg_pooled)


# ---------------------------------------------------------------------------------------------------- rollout

def their_rollout(S, pwl, B, seed):
    g = torch.Generator(device=S.dev).manual_seed(seed)
    images, lats, lps = pwl(S.pipe, **S.theirs_embeds(B), num_inference_steps=S.a.steps,
                            guidance_scale=S.a.guidance, output_type="pt", height=S.res, width=S.res,
                            noise_level=S.a.noise_level, generator=g, max_sequence_length=S.a.text_slots)
    return images, torch.stack(lats, 1), torch.stack(lps, 1)


def _start(S, B, seed):
    """-> generator, z_0 (B, C, h, w), our velocity, conditioning: what both of our samplers begin with."""
    from densegrpo_fast.rollout.sampler import GuidedVelocity
    g = torch.Generator(device=S.dev).manual_seed(seed)
    z0 = torch.randn(B, *S.latent_shape, generator=g, device=S.dev)
    return g, z0, GuidedVelocity(S.ours_tr, S.a.guidance, S.family), S.cond(B)


@torch.no_grad()
def our_rollout(S, B, seed):
    from densegrpo_fast.rollout.sampler import sde_rollout
    g, z0, vel, cond = _start(S, B, seed)
    traj = sde_rollout(vel, cond, z0, S.sched.sigmas, S.sched.noise_levels, g)
    return S.models.decode(traj.latents[:, -1]), traj.latents, traj.log_probs


# ------------------------------------------------------------------------------------------------ train step

def batch_of_transitions(S, B, seed):
    """B stored transitions (z_k, z_{k+1}, k, old log-prob, advantage) from one of our rollouts."""
    _, lats, lps = our_rollout(S, B, seed)
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, int(0.99 * S.a.steps), (B,), generator=g).to(S.dev)
    r = torch.arange(B, device=S.dev)
    return dict(z=lats[r, k], zn=lats[r, k + 1], k=k, old=lps[r, k], adv=torch.randn(B, generator=g).to(S.dev))


def their_logprob(S, sde, model, x, with_grad=True):
    """Flow-GRPO's compute_log_prob (train_sd3.py): CFG forward over [neg; pos] with the unconditional half
    detached, then their sde_step_with_logprob with prev_sample = the stored next latent."""
    B = x["z"].shape[0]
    c = S.cond(B)
    t = S.pipe.scheduler.timesteps[x["k"]]
    with torch.set_grad_enabled(with_grad):
        out = model(hidden_states=torch.cat([x["z"]] * 2), timestep=torch.cat([t, t]),
                    encoder_hidden_states=torch.cat([c.neg_embeds, c.embeds]),
                    pooled_projections=torch.cat([c.neg_pooled, c.pooled]), return_dict=False)[0]
        vu, vc = out.chunk(2)
        v = vu.detach() + S.a.guidance * (vc - vu.detach())
        _, lp, mean, std = sde(S.pipe.scheduler, v.float(), t, x["z"].float(), noise_level=S.a.noise_level,
                               prev_sample=x["zn"].float())
    return lp, mean, std


def their_train_step(S, sde, opt, x):
    from densegrpo_fast.models.lora import adapter_disabled
    lp, mean, std = their_logprob(S, sde, S.tr, x)
    with torch.no_grad(), adapter_disabled(S.tr):
        _, mean_ref, _ = their_logprob(S, sde, S.tr, x, with_grad=False)
    ratio = torch.exp(lp - x["old"])
    eps = S.a.clip_range
    policy = torch.mean(torch.maximum(-x["adv"] * ratio, -x["adv"] * torch.clamp(ratio, 1 - eps, 1 + eps)))
    kl = torch.mean(((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std ** 2))
    (policy + S.a.beta * kl).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def our_train_step(S, opt, x, model=None):
    from densegrpo_fast import ops
    from densegrpo_fast.models.lora import adapter_disabled
    from densegrpo_fast.rollout.sampler import GuidedVelocity
    B = x["z"].shape[0]
    c = S.cond(B)
    t = S.sched.sigmas[x["k"]]
    v = GuidedVelocity(model or S.ours_tr, S.a.guidance, S.family, grad_uncond=False)(x["z"], t, c)  # cfg_grad=cond
    with torch.no_grad(), adapter_disabled(S.tr):
        v_ref = GuidedVelocity(model or S.ours_tr, S.a.guidance, S.family)(x["z"], t, c)
    lp, kl = ops.sde_logprob(x["z"], v, x["zn"], S.sched.sigmas, S.sched.noise_levels, x["k"], v_ref)
    loss, _, _ = ops.grpo_loss(lp, x["old"], x["adv"], None, S.a.clip_range, kl, S.a.beta)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def check_logprobs(S, sde, B=8) -> float:
    """Max |their log-prob - ours| on the same stored transitions and the same (eager) velocity."""
    from densegrpo_fast import ops
    from densegrpo_fast.rollout.sampler import GuidedVelocity
    x = batch_of_transitions(S, B, seed=123)
    with torch.no_grad():
        lp_theirs, _, _ = their_logprob(S, sde, S.tr, x, with_grad=False)
        v = GuidedVelocity(S.tr, S.a.guidance, S.family)(x["z"], S.sched.sigmas[x["k"]], S.cond(B))
        lp_ours, _ = ops.sde_logprob(x["z"], v, x["zn"], S.sched.sigmas, S.sched.noise_levels, x["k"])
    return float((lp_theirs.double() - lp_ours.double()).abs().max())


# ----------------------------------------------------------------------------------------------------- epoch

def _advantages(rewards, G):
    from densegrpo_fast.credit.advantages import group_advantages
    return group_advantages(rewards, torch.arange(rewards.numel()) // G, "global", 5.0)


def epoch(S, rollout_fn, train_fn, seed):
    """N trajectories in batches of B (rewards scored in a thread pool while the next batch samples), group
    advantages, then every (trajectory, trained step) pair in micro-batches, one optimizer step per micro-batch."""
    a = S.a
    N, B, mb = a.prompts * a.group, a.batch, a.micro_batch
    lats, lps, futs = [], [], []
    for s in range(0, N, B):
        images, la, lp = rollout_fn(B, seed + s)
        futs.append(S.pool.submit(S.reward, images.float().cpu(), ["x"] * B))
        lats.append(la)
        lps.append(lp)
    lats, lps = torch.cat(lats), torch.cat(lps)
    adv = _advantages(torch.cat([f.result()[0] for f in futs]), a.group).to(S.dev)
    T_train = int(0.99 * a.steps)
    pairs = torch.stack(torch.meshgrid(torch.arange(N), torch.arange(T_train), indexing="ij"), -1).view(-1, 2)
    pairs = pairs[torch.randperm(pairs.shape[0], generator=torch.Generator().manual_seed(seed))].to(S.dev)
    for s in range(0, pairs.shape[0], mb):
        i, k = pairs[s:s + mb, 0], pairs[s:s + mb, 1]
        train_fn(dict(z=lats[i, k], zn=lats[i, k + 1], k=k, old=lps[i, k], adv=adv[i]))


# ----------------------------------------------------------------------------------------------------- dense

@torch.no_grad()
def their_dense(S, pwl, sde, B, seed):
    """Their rollout, then an ODE completion from every z_k with their step function (noise level 0), one
    completion at a time; each decoded and scored."""
    images, lats, _ = their_rollout(S, pwl, B, seed)
    c = S.cond(B)
    ts = S.pipe.scheduler.timesteps
    outs = [images]
    for k in range(S.a.steps):
        z = lats[:, k]
        for j in range(k, S.a.steps):
            t = ts[j].expand(B)
            out = S.tr(hidden_states=torch.cat([z, z]), timestep=torch.cat([t, t]),
                       encoder_hidden_states=torch.cat([c.neg_embeds, c.embeds]),
                       pooled_projections=torch.cat([c.neg_pooled, c.pooled]), return_dict=False)[0]
            vu, vc = out.chunk(2)
            z, _, _, _ = sde(S.pipe.scheduler, (vu + S.a.guidance * (vc - vu)).float(), t, z.float(), noise_level=0.0)
        outs.append(S.models.decode(z))
    return S.reward(torch.cat(outs).float().cpu(), ["x"] * (B * (S.a.steps + 1)))


@torch.no_grad()
def our_dense(S, B, seed):
    from densegrpo_fast.rollout.completions import dense_rollout
    g, z0, vel, cond = _start(S, B, seed)
    dr = dense_rollout(vel, cond, z0, S.sched.sigmas, S.sched.noise_levels, g)
    finals = torch.cat([dr.completions, dr.trajectory.latents[:, -1:]], 1).flatten(0, 1)
    return S.reward(S.models.decode(finals).cpu(), ["x"] * finals.shape[0])


# ----------------------------------------------------------------------------------------------------- driver

def run(a) -> list[dict]:
    S = Setup(a)
    theirs_available = not a.ours_only
    if theirs_available:
        pwl, sde = load_flow_grpo(a.flow_grpo_src)
    rows = []
    # same latent size on both sides
    if theirs_available:
        _, lt, _ = their_rollout(S, pwl, 1, 0)
        assert tuple(lt.shape[2:]) == tuple(S.latent_shape), (lt.shape, S.latent_shape)
        diff = check_logprobs(S, sde)
        print(f"log-prob check (fp32, mean reduction, same inputs): max |theirs - ours| = {diff:.2e}", flush=True)
        if diff > 1e-5:
            raise SystemExit(f"log-probs disagree by {diff:.2e} > 1e-5")
        rows.append({"case": "logprob max abs diff", "value": diff})

    opt_t = torch.optim.AdamW(S.trainable, lr=1e-5)
    phases = a.phases.split(",")
    B = a.batch
    cases = []
    if "rollout" in phases:
        cases.append(("rollout B=%d" % B, (lambda r: their_rollout(S, pwl, B, r)) if theirs_available else None,
                      lambda r: our_rollout(S, B, r), B))
    if "train" in phases:
        x = batch_of_transitions(S, a.micro_batch, 7)
        cases.append(("train step B=%d" % a.micro_batch,
                      (lambda r: their_train_step(S, sde, opt_t, x)) if theirs_available else None,
                      lambda r: our_train_step(S, opt_t, x), a.micro_batch))
    if "epoch" in phases:
        N = a.prompts * a.group
        cases.append((f"epoch N={N}",
                      (lambda r: epoch(S, lambda b, s: their_rollout(S, pwl, b, s),
                                       lambda x: their_train_step(S, sde, opt_t, x), r)) if theirs_available else None,
                      lambda r: epoch(S, lambda b, s: our_rollout(S, b, s), lambda x: our_train_step(S, opt_t, x), r),
                      N))
    if "dense" in phases:
        cases.append(("dense B=%d" % a.dense_batch,
                      (lambda r: their_dense(S, pwl, sde, a.dense_batch, r)) if theirs_available else None,
                      lambda r: our_dense(S, a.dense_batch, r), a.dense_batch))
    # the network work of each side, counted once per case in an eager pass (hooks on the transformer; ours runs
    # its eager transformer here, the same forwards its compiled one runs): rows through the network, and how many
    # of them with autograd (those also run a backward)
    work = {}
    for name, theirs, ours, n in cases:
        work[name] = {"ours": count_rows(S, ours)}
        if theirs is not None:
            work[name]["theirs"] = count_rows(S, theirs)
    # warm-up (and compile) of every case before any timed round: a case's compile seconds are its first call's
    # excess over its second call (later cases may reuse graphs compiled by earlier ones)
    compile_s = {}
    for name, theirs, ours, n in cases:
        first = timed(lambda: ours(0))
        second = timed(lambda: ours(0))
        compile_s[name] = max(0.0, first - second) if a.compile != "off" else 0.0
        if theirs is not None:
            theirs(0)
    if a.compile != "off":
        print(f"compile (first calls' excess, all cases): {sum(compile_s.values()):.1f} s", flush=True)
    for name, theirs, ours, n in cases:
        t_th, t_ou = [], []
        for r in range(a.rounds):
            if theirs is not None:
                t_th.append(timed(lambda: theirs(r + 1)))
            t_ou.append(timed(lambda: ours(r + 1)))
        row = {"case": name, "n": n, "ours_median_s": statistics.median(t_ou), "ours_min_s": min(t_ou),
               "ours_max_s": max(t_ou), "compile_s": compile_s[name]}
        if t_th:
            row.update(theirs_median_s=statistics.median(t_th), theirs_min_s=min(t_th), theirs_max_s=max(t_th))
            row["speedup"] = row["theirs_median_s"] / row["ours_median_s"]
            row.update(rows_theirs=work[name]["theirs"], rows_ours=work[name]["ours"])
            # the speed-up as (their work / ours) x (our speed per unit of work / theirs); a unit is a row forward,
            # a row with autograd counts 3 (its forward and a backward of about twice its cost)
            units = lambda w: w[0] + 2 * w[1]  # noqa: E731
            row["work_ratio"] = units(row["rows_theirs"]) / units(row["rows_ours"])
            row["per_work_speed"] = row["speedup"] / row["work_ratio"]
        rows.append(row)
        print(_fmt(row), flush=True)
    return rows


def count_rows(S, fn) -> tuple:
    """Run fn(0) once eagerly with a hook on the transformer -> (rows through it, rows of them with autograd)."""
    rows = [0, 0]

    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        rows[0] += x.shape[0]
        rows[1] += x.shape[0] if torch.is_grad_enabled() else 0
    compiled, S.ours_tr = S.ours_tr, S.tr
    h = S.tr.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        fn(0)
    finally:
        h.remove()
        S.ours_tr = compiled
    return tuple(rows)


TARGETS = {"rollout": 1.5, "train step": 1.5, "epoch": 1.5, "dense": 2.5}


def target_of(case: str):
    return next((t for k, t in TARGETS.items() if case.startswith(k)), None)


def _fmt(r: dict) -> str:
    if "ours_median_s" not in r:
        return f"{r['case']}: {r['value']:.2e}"
    th = (f"theirs {r['theirs_median_s']:.3f} s [{r['theirs_min_s']:.3f}-{r['theirs_max_s']:.3f}]  "
          if "theirs_median_s" in r else "")
    sp = f"  x{r['speedup']:.2f}" if "speedup" in r else ""
    cs = f"  (compile {r['compile_s']:.1f} s)" if r["compile_s"] else ""
    wk = ""
    if "work_ratio" in r:
        wk = (f"\n{'':<18} network rows theirs {r['rows_theirs'][0]} ({r['rows_theirs'][1]} with grad), ours "
              f"{r['rows_ours'][0]} ({r['rows_ours'][1]}): work x{r['work_ratio']:.2f} less, "
              f"x{r['per_work_speed']:.2f} faster per unit of work")
    return f"{r['case']:<18} {th}ours {r['ours_median_s']:.3f} s [{r['ours_min_s']:.3f}-{r['ours_max_s']:.3f}]{sp}{cs}{wk}"


def default_compile_mode() -> str:
    """The mode model.compile=auto chooses for configs/shapes_default.yaml (make train) here, now."""
    from densegrpo_fast.config import load_config
    from densegrpo_fast.eval import DEFAULT_MODEL
    from densegrpo_fast.models import load_pipeline
    from densegrpo_fast.models.base import resolve_compile
    cfg = load_config(os.path.join(ROOT, "configs", "shapes_default.yaml"))
    tr = load_pipeline(cfg.model.path or DEFAULT_MODEL, "sd3", torch.float32).transformer
    return resolve_compile(cfg.model.compile, tr, cfg.run.epochs, cfg.run.wall_clock_budget_s,
                           cfg.train.zero_stage)[0]


def write_results(rows: list[dict], a, path: str, column: str = "") -> None:
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from conftest import device_name
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "device", "torch", "case", "path", "median_ms", "GB/s", "frac_copy_same",
                        "frac_copy_machine", "x_eager"])
        now = datetime.datetime.now().isoformat(timespec="seconds")
        for r in rows:
            if "ours_median_s" not in r:
                continue
            tag = f"vs_flow_grpo {r['case']} {column + ' ' if column else ''}compile={a.compile} {a.dtype}"
            if "theirs_median_s" in r:
                w.writerow([now, device_name(), torch.__version__, tag, "flow_grpo", f"{r['theirs_median_s']*1e3:.1f}",
                            "", "", "", "1.00"])
            w.writerow([now, device_name(), torch.__version__, tag, "ours", f"{r['ours_median_s']*1e3:.1f}", "", "",
                        "", f"{r['speedup']:.2f}" if "speedup" in r else ""])


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--flow-grpo-src", default=os.environ.get("FLOW_GRPO_SRC"),
                   help="a local checkout of github.com/yifan123/flow_grpo (or FLOW_GRPO_SRC)")
    p.add_argument("--ours-only", action="store_true", help="time our side alone (no Flow-GRPO checkout needed)")
    p.add_argument("--model", default=None, help="a local diffusers SD3 folder (default: the shipped tiny model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", default="default", choices=["off", "default", "reduce-overhead", "max-autotune"],
                   help="our compile mode in the 'best' column")
    p.add_argument("--columns", default="defaults,best", help="defaults (model.compile: auto as make train), best")
    p.add_argument("--phases", default="rollout,train,epoch,dense")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--noise-level", type=float, default=0.7)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--text-slots", type=int, default=128, help="T5 token slots (their train_sd3.py: 128)")
    p.add_argument("--batch", type=int, default=8, help="rollout batch")
    p.add_argument("--micro-batch", type=int, default=16, help="training micro-batch")
    p.add_argument("--prompts", type=int, default=2, help="epoch: prompts")
    p.add_argument("--group", type=int, default=8, help="epoch: group size")
    p.add_argument("--dense-batch", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--clip-range", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results.csv"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    if not a.ours_only and not a.flow_grpo_src:
        p.error("give --flow-grpo-src DIR (a local checkout of github.com/yifan123/flow_grpo) or set FLOW_GRPO_SRC; "
                "--ours-only times our side alone")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    from densegrpo_fast.utils.cli_helpers import _quiet
    _quiet()
    rows = []
    for col in a.columns.split(","):
        import copy
        ac = copy.copy(a)
        if col == "defaults":
            ac.compile = default_compile_mode()
            print(f"== defaults: model.compile=auto for configs/shapes_default.yaml -> {ac.compile}", flush=True)
        elif col == "best":
            print(f"== best: compile {ac.compile}", flush=True)
        else:
            raise SystemExit(f"--columns: unknown column {col!r} (defaults, best)")
        part = run(ac)
        for r in part:
            r["column"] = col
        write_results(part, ac, a.results, col)
        rows += part
    cols = a.columns.split(",")
    print("\n| case | " + " | ".join(cols) + " | target | their network work / ours | speed per unit of work |")
    print("|---|" + "---|" * (len(cols) + 3))
    for case in dict.fromkeys(r["case"] for r in rows if "speedup" in r):
        mine = [r for r in rows if r["case"] == case and "speedup" in r]
        cells = [next((f"x{r['speedup']:.2f}" for r in mine if r["column"] == c), "") for c in cols]
        first = mine[0]
        target = target_of(case)
        verdict = "" if target is None else f"x{target:g} " + (
            "met" if next((r for r in mine if r["column"] == cols[0]))["speedup"] >= target else "missed")
        per = " / ".join(f"x{r['per_work_speed']:.2f}" for r in mine)
        print(f"| {case} | " + " | ".join(cells) + f" | {verdict} | x{first['work_ratio']:.2f} | {per} |")
    print("(speed-up = their network work / ours x our speed per unit of work; a target the work ratio does not "
          "reach needs the rest from faster kernels: docs/performance.md, 'Where the time goes')")
    print(f"\nappended to {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
