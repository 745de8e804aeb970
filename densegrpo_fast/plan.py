"""`densegrpo plan --config C [--world N]`: will this recipe fit? Per-GPU memory and network work of one epoch,
computed from the model folder's config.json files alone (no weights are read: the modules are built on the meta
device, so parameter counts are exact). A tiny config (model.path null) builds its tiny random model in a temporary
folder first, as a run would.

What it prints, per GPU (`--world` ranks, ZeRO stage from the config):
  weights        transformer + VAE + text encoders in model.dtype (ZeRO-3 partitions the transformer by world)
  LoRA + optim   LoRA weights (model.dtype), their gradients, fp32 master copy and two AdamW moments (fp32),
                 partitioned as ZeRO stage 1 (optimizer states), 2 (+ gradients), 3 (+ weights) do
  activations    training micro-batch: what autograd keeps plus the backward's working set, ~31 x tokens x hidden
                 bytes per block per row in 16-bit, x2 in fp32 (attention with a fused kernel: no tokens^2 term;
                 Korthikanti et al. 2022 count 34 for a GPT block); rows = micro_batch (x2 for the CFG rows of
                 train.cfg_grad=both)
  rollout peak   the largest no-grad forward (the staircase's last solver index for dense methods): one block's
                 working set, ~ rows x tokens x hidden x 27 bytes in 16-bit, x2 in fp32
                 Both coefficients are measured: bench/memory_vs_plan.py, an SD3.5-M-sized transformer with LoRA
                 r 32, fp32 on the CPU, peak RSS over the loaded model with glibc's mmap threshold fixed (the
                 resident set then follows live memory; docs/results/memory_vs_plan.md); the 16-bit figures are
                 those halved, not measured.
  text cache     prompt embeddings kept on the host (model.text_cache_size prompts) and one batch on the device
  forwards       network evaluations per epoch by phase (CFG counted), all ranks together
Estimates, not measurements: use them to pick the size of a run, then read peak memory from a real one.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _meta_count(build) -> tuple[int, object]:
    import torch
    with torch.device("meta"):
        m = build()
    return sum(p.numel() for p in m.parameters()), m


def _read(folder: str, sub: str) -> Optional[dict]:
    path = os.path.join(folder, sub, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def count_parameters(folder: str, family: str) -> tuple[dict, object]:
    """Exact parameter counts of the folder's components from their config.json files (meta device).
    -> ({component: count}, the transformer on the meta device)."""
    import diffusers
    import transformers
    out = {}
    tcfg = _read(folder, "transformer")
    if tcfg is None:
        raise FileNotFoundError(f"'{os.path.join(folder, 'transformer', 'config.json')}' not found (model.path)")
    if "_class_name" not in tcfg:
        raise ValueError(f"'{os.path.join(folder, 'transformer', 'config.json')}': no _class_name (model.path)")
    cls = getattr(diffusers, tcfg["_class_name"])
    out["transformer"], transformer = _meta_count(lambda: cls.from_config(tcfg))
    vcfg = _read(folder, "vae")
    if vcfg is not None:
        vcls = getattr(diffusers, vcfg.get("_class_name", "AutoencoderKL"))
        out["vae"], _ = _meta_count(lambda: vcls.from_config(vcfg))
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        c = _read(folder, sub)
        if c is None:
            continue
        arch = (c.get("architectures") or [None])[0]
        mcls = getattr(transformers, arch) if arch and hasattr(transformers, arch) else transformers.AutoModel
        conf = transformers.AutoConfig.for_model(**{k: v for k, v in c.items() if k != "architectures"})
        out[sub], _ = _meta_count(lambda: mcls(conf))
    return out, transformer


def lora_parameters(transformer, targets: list, r: int) -> int:
    """r * (in + out) for every Linear whose name ends with one of the LoRA targets."""
    import torch
    n = 0
    for name, mod in transformer.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += r * (mod.in_features + mod.out_features)
    return n


def _gb(x: float) -> str:
    return f"{x / 2 ** 30:.2f} GiB"


def tiny_folder(cfg, parent: str) -> str:
    """Write the tiny model a run of this config (model.path null) would build, under `parent`: the same family,
    model.tiny spec and prompt vocabulary as the trainer's. -> its folder."""
    from .models import resolve_family
    from .models.registry import get_family
    from .prompts import load_prompts, vocabulary
    prompts = load_prompts(cfg.prompts, "train") + (load_prompts(cfg.prompts, cfg.eval.split) if cfg.eval.enabled
                                                    else [])
    folder = os.path.join(parent, "tiny_model")
    get_family(resolve_family(cfg.model)).build_tiny(folder, vocabulary(prompts), cfg.model.tiny, seed=cfg.run.seed)
    return folder


def plan(cfg, world: int = 1, folder: Optional[str] = None) -> dict:
    """The figures of the module docstring for a validated Config; folder defaults to model.path."""
    from .models.registry import family_of_folder, get_family
    from .models.lora import lora_targets
    folder = folder or cfg.model.path
    if folder is None:  # a tiny config: its model is defined by model.tiny, so build it (seconds) and read that
        import tempfile
        with tempfile.TemporaryDirectory(prefix="densegrpo-plan-") as tmp:
            p = plan(cfg, world, tiny_folder(cfg, tmp))
        p["folder"] = "model.tiny (a tiny random model built from the config)"
        return p
    family = cfg.model.family
    if family == "auto":
        family = family_of_folder(folder)
    fam = get_family(family)
    counts, tr = count_parameters(folder, family)
    tcfg = tr.config
    b = BYTES[cfg.model.dtype]
    zs = cfg.train.zero_stage
    # geometry: the family's (latent side, image and text tokens, rows per sample per forward)
    geo = fam.plan_geometry(dict(tcfg), _read(folder, "vae") or {}, cfg.model.resolution,
                            cfg.model.max_sequence_length, cfg.sampling.guidance)
    res, lat, text_tokens, cfg_rows = geo["resolution"], geo["latent"], geo["text_tokens"], geo["cfg_rows"]
    tokens = geo["image_tokens"] + text_tokens
    hidden = tcfg.num_attention_heads * tcfg.attention_head_dim
    blocks = tcfg.num_layers + (getattr(tcfg, "num_single_layers", 0) or 0)
    # memory
    weights_other = sum(v for k, v in counts.items() if k != "transformer") * b
    weights_tr = counts["transformer"] * b / (world if zs == 3 else 1)
    n_lora = lora_parameters(tr, lora_targets(cfg.model.lora, fam), cfg.model.lora.r)
    lora_w = n_lora * b / (world if zs == 3 else 1)
    lora_g = n_lora * b / (world if zs >= 2 else 1)
    opt = n_lora * (4 + 8) / world                       # fp32 master + 2 moments, partitioned from stage 1
    if cfg.model.dtype == "float32":
        opt = n_lora * 8 / world                         # fp32 weights are their own master copy
    act_rows = cfg.train.micro_batch * (cfg_rows if cfg.train.cfg_grad == "both" else 1)
    act = 31 * tokens * hidden * blocks * act_rows * (b / 2)   # measured: module docstring
    T = cfg.sampling.steps
    B = cfg.sampling.sample_batch
    m = cfg.credit.method
    if m in ("dense", "turning_point"):
        roll_rows = min(B * T, cfg.credit.max_completion_batch) * cfg_rows
    elif m == "branching":
        roll_rows = B * cfg.credit.branches * cfg_rows
    else:
        roll_rows = B * cfg_rows
    roll = roll_rows * tokens * hidden * 27 * (b / 2)          # measured: module docstring
    emb_per_prompt = (text_tokens * tcfg.joint_attention_dim + (getattr(tcfg, "pooled_projection_dim", 0) or 0)) * b
    cache_host = cfg.model.text_cache_size * emb_per_prompt
    cache_dev = 2 * max(B, cfg.train.micro_batch) * cfg_rows * emb_per_prompt
    # network evaluations per epoch, all ranks
    G = cfg.train.group_size
    P = cfg.train.prompts_per_epoch
    n_train = max(1, int(math.floor(cfg.train.timestep_fraction * T)))
    if m == "branching":
        k_steps = len(cfg.credit.branch_steps)
        seeds = G // cfg.credit.branches
        rows = P * seeds * k_steps * cfg.credit.branches
        main = P * seeds * (max(cfg.credit.branch_steps) + 1)
        comp = sum(P * seeds * cfg.credit.branches * (T - k - 1) for k in cfg.credit.branch_steps)
        fw = {"rollout": main * cfg_rows, "completions": comp * cfg_rows}
        pairs = rows
    else:
        N = P * G
        fw = {"rollout": N * T * cfg_rows}
        if m in ("dense", "turning_point"):
            cs = cfg.credit.completion_steps
            per = T * (T - 1) // 2 if cs == "remaining" else sum(max(0, min(int(cs), T - k) - 1) for k in range(T))
            fw["completions"] = N * per * cfg_rows
        W = cfg.credit.window
        pairs = N * (min(W, n_train) if W else n_train)
    fw["training (policy)"] = pairs * cfg_rows
    if cfg.train.beta_kl > 0:
        fw["training (reference)"] = pairs * cfg_rows
    decodes = (P * G * (T + 1)) if m in ("dense", "turning_point") else (pairs if m == "branching" else P * G)
    return {
        "family": family, "folder": folder, "world": world, "zero_stage": zs, "dtype": cfg.model.dtype,
        "resolution": res, "latent": lat, "tokens": tokens, "hidden": hidden, "blocks": blocks,
        "params": counts, "lora_params": n_lora,
        "memory": {"weights (transformer)": weights_tr, "weights (VAE + text encoders)": weights_other,
                   "LoRA weights": lora_w, "LoRA gradients": lora_g, "optimizer (fp32 master + AdamW)": opt,
                   f"activations (train micro-batch {act_rows} rows)": act,
                   f"rollout peak (largest forward, {roll_rows} rows)": roll,
                   "text embeddings on the device (one batch)": cache_dev},
        "host": {f"text cache ({cfg.model.text_cache_size} prompts, host)": cache_host},
        "forwards": fw, "decodes": decodes,
    }


def format_plan(p: dict) -> str:
    lines = [f"densegrpo plan — {p['family']} from {p['folder']}: {p['resolution']} px (latent {p['latent']}, "
             f"{p['tokens']} tokens), {p['blocks']} blocks x hidden {p['hidden']}, {p['dtype']}, "
             f"ZeRO-{p['zero_stage']} on {p['world']} GPU(s)", "",
             "| parameters | count |", "|---|---|"]
    for k, v in p["params"].items():
        lines.append(f"| {k} | {v / 1e6:,.1f} M |")
    lines.append(f"| LoRA (trainable) | {p['lora_params'] / 1e6:,.2f} M |")
    lines += ["", "| per-GPU memory | estimate |", "|---|---|"]
    for k, v in p["memory"].items():
        lines.append(f"| {k} | {_gb(v)} |")
    lines.append(f"| **total** | **{_gb(sum(p['memory'].values()))}** |")
    for k, v in p["host"].items():
        lines.append(f"| {k} | {_gb(v)} |")
    lines += ["", "activations and rollout peak: formulas checked against measured CPU fp32 peaks (peak RSS over the "
              "loaded model), SD3.5-M size with LoRA r 32: 24 blocks at 256 px within 4 % / 2 %, 6 blocks at 512 px "
              "within 6 % / 4 % (bench/memory_vs_plan.py, docs/results/memory_vs_plan.md)"]
    lines += ["", "| network evaluations per epoch (all ranks, CFG counted) | count |", "|---|---|"]
    for k, v in p["forwards"].items():
        lines.append(f"| {k} | {v:,} |")
    lines.append(f"| VAE decodes + reward calls (images) | {p['decodes']:,} |")
    return "\n".join(lines)


def plan_main(argv) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="densegrpo plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--world", type=int, default=1, help="number of GPUs (data-parallel ranks)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = ap.parse_args(argv)
    from .utils.cli_helpers import load_config_or_none
    cfg = load_config_or_none(a.config, a.overrides)
    if cfg is None:
        return 2
    p = plan(cfg, a.world)
    print(json.dumps({k: v for k, v in p.items()}, indent=1, default=str) if a.json else format_plan(p))
    return 0
