"""The configuration reference, generated from the dataclasses of `config.py`:

    python -m densegrpo_fast.configdoc > docs/configuration.md

Type and default come from the dataclass fields, the allowed range from the validation table, the meaning from the
comment beside or above the field in `config.py` (or, for a field without one, from `MEANINGS` below). A test
regenerates the page and fails when docs/configuration.md differs, or when a field has no meaning.
"""
from __future__ import annotations

import ast
import dataclasses
import io
import json
import tokenize
import typing

from . import config as C

# Meanings of the fields that carry no comment in config.py.
MEANINGS = {
    "run.name": "name of the run (the run folder is output_dir/name unless --run-dir is given)",
    "run.output_dir": "folder under which run folders are made",
    "run.seed": "training seed: rollout noise is keyed by (seed, epoch, trajectory index), never by rank",
    "run.epochs": "number of epochs (a wall-clock budget may stop earlier)",
    "model.tiny.resolution": "image size in pixels of the tiny model",
    "model.tiny.latent_channels": "VAE latent channels of the tiny model",
    "model.tiny.vae_block_channels": "VAE block widths; the VAE downsamples by 2^(len - 1)",
    "model.tiny.num_layers": "transformer blocks (FLUX: this many double- and this many single-stream blocks)",
    "model.tiny.num_attention_heads": "attention heads of the tiny transformer",
    "model.tiny.attention_head_dim": "width of one attention head",
    "model.tiny.text_hidden": "hidden size of the tiny text encoders",
    "model.tiny.text_layers": "layers of the tiny text encoders",
    "model.tiny.tokenizer_max_length": "CLIP tokens per prompt of the tiny tokenizer",
    "model.lora.r": "LoRA rank",
    "model.lora.alpha": "LoRA alpha (the update is scaled by alpha / r)",
    "model.lora.dropout": "LoRA dropout",
    "model.lora.targets": "module names (suffixes) of the transformer's Linear layers that get LoRA adapters",
    "model.dtype": "weights and activations dtype (LoRA's optimizer state stays fp32)",
    "model.attention": "attention kernel: torch SDPA, or xformers (optional GPU extra)",
    "sampling.steps": "denoising steps T of the rollout",
    "sampling.eval_steps": "ODE steps of held-out evaluation and of `densegrpo eval`",
    "sampling.guidance": "classifier-free guidance scale (FLUX.1-dev: the guidance embedding, one forward per sample)",
    "sampling.noise_level": "SDE noise level a: s_k = a sqrt(sigma / (1 - sigma)) (Flow-GRPO's schedule)",
    "sampling.variant": "stochastic step: Flow-GRPO's SDE or the CPS (coefficients-preserving) sampler",
    "sampling.shift": "timestep shift of the flow-matching schedule (FLUX: computed from the sequence length)",
    "train.prompts_per_epoch": "prompts per epoch (all ranks together)",
    "train.group_size": "trajectories per prompt: the GRPO group",
    "train.optimizer_steps_per_epoch": "optimizer steps per epoch; the epoch's pairs are split into this many windows",
    "train.lr": "AdamW learning rate of the LoRA weights",
    "train.betas": "AdamW betas [beta1, beta2]",
    "train.weight_decay": "AdamW weight decay",
    "train.grad_clip": "gradient-norm clip",
    "train.clip_range": "PPO clip range epsilon of the ratio",
    "train.beta_kl": "weight beta of the KL term to the reference (LoRA off); 0 skips the reference forward",
    "train.adv_std": "advantage normalisation: by the group's std or one std over the batch",
    "train.adv_clip": "advantages are clipped to [-adv_clip, adv_clip]",
    "train.drop_zero_advantage": "skip pairs with advantage exactly 0 (their policy term is 0; their KL term is given "
                                 "up with them)",
    "train.ema_decay": "decay of the EMA copy of the LoRA weights (evaluated and saved as lora_ema/)",
    "train.zero_stage": "DeepSpeed ZeRO stage: 1 optimizer states, 2 + gradients, 3 + weights partitioned",
    "reward.weights": "simple form: reward name -> weight; the reward is the weighted sum",
    "prompts.source": "where prompts come from: the shapes grammar, a file, or the inline list `items`",
    "prompts.items": "the prompts of source=list",
    "prompts.split": "the shapes split trained on",
    "credit.method": "credit method: sparse (Flow-GRPO, Flow-GRPO-Fast with window), dense (DenseGRPO), "
                     "turning_point (TP-GRPO), branching (TempFlow-GRPO)",
    "credit.turning_point_constraint": "TP-GRPO: require a turning point's local gain to agree in sign with the "
                                       "change to the end",
    "credit.turning_point_balance": "TP-GRPO: balance positive and negative turning points",
    "credit.branch_steps": "TempFlow-GRPO: the steps at which trajectories branch",
    "credit.branches": "TempFlow-GRPO: branches per branching step",
    "credit.noise_aware_weights": "TempFlow-GRPO: weight each step's loss by its noise level",
    "eval.enabled": "held-out evaluation before and after training (and at run.eval_every / run.eval_every_s)",
    "eval.split": "the prompts evaluated (shapes splits; list/file sources have one split)",
    "eval.samples_per_prompt": "images per prompt in an evaluation",
    "eval.guidance": "CFG scale of evaluation",
    "eval.grid": "write a grid PNG of evaluation images",
    "ops.backend": "fused-op backend: auto (Triton on CUDA tensors, C++ on the CPU), or one forced",
}


def _comments() -> dict:
    """'Class.field' -> the comment beside the field, or the block of comment lines right above it."""
    import inspect
    src = inspect.getsource(C)
    lines = src.splitlines()
    trailing = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1].strip() != tok.string.strip():
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in ast.parse(src).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            text = [trailing[n] for n in range(item.lineno, item.end_lineno + 1) if n in trailing]
            above, n = [], item.lineno - 2
            while n >= 0 and lines[n].strip().startswith("#"):
                above.insert(0, lines[n].strip().lstrip("#").strip())
                n -= 1
            out[f"{node.name}.{item.target.id}"] = " ".join(above + text)
    return out


def _type(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type(inner[0]) + " or null"
    return getattr(tp, "__name__", str(tp))


def _range(key: str) -> str:
    check = C._CHECKS.get(key)
    if check is None:
        return ""
    import inspect
    body = inspect.getsource(check).split(f'"{key}":', 1)[1].split("lambda v:", 1)[1]
    depth, expr = 0, ""
    for ch in body:  # up to the comma that ends this lambda
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                break
            depth -= 1
        elif ch == "," and depth == 0:
            break
        expr += ch
    import re
    return "`" + re.sub(r"\bv\b", key.split(".")[-1], expr.strip()) + "`"


def rows(cls=C.Config, prefix: str = "", comments: dict = None) -> list:
    """(key, type, default, range, meaning) for every leaf field, in declaration order."""
    comments = _comments() if comments is None else comments
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += rows(tp, key, comments)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        meaning = comments.get(f"{cls.__name__}.{f.name}") or MEANINGS.get(key, "")
        out.append((key, _type(tp), json.dumps(default), _range(key), meaning))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the dataclasses in `densegrpo_fast/config.py` by "
             "`python -m densegrpo_fast.configdoc > docs/configuration.md`; do not edit by hand "
             "(a test fails when this page is out of date).", "",
             "A config is a YAML file of these sections (`configs/*.yaml`); `--set section.key=value` overrides any "
             "key on the command line. An unknown key, a value of the wrong type or outside its range is an error "
             "naming the key before any work is done. `run.output_dir`/`run.name` is the run folder unless "
             "`--run-dir` is given.", ""]
    section = None
    for key, tp, default, rng, meaning in rows():
        top = key.split(".")[0]
        if top != section:
            section = top
            lines += ["", f"## `{section}`", "", "| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        lines.append(f"| `{key}` | {_cell(tp)} | `{_cell(default)}` | {_cell(rng)} | "
                     f"{_cell(meaning)} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


if __name__ == "__main__":
    print(render(), end="")
