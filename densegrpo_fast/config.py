"""Typed run configuration: YAML files in `configs/`, `--set section.key=value` overrides, strict validation.

Every section is a dataclass; a key that is not a field, or a value of the wrong type or outside its allowed set,
raises `ConfigError` naming `section.key` and what is allowed, before any work is done.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A broken config: the message names the file and the offending key."""


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    epochs: int = 2
    save_every: int = 1          # checkpoint every N epochs (0 = never)
    eval_every: int = 0          # held-out eval every N epochs (0 = only before/after, when eval.enabled)
    progress: bool = True        # tqdm bars on the main rank
    wall_clock_budget_s: float = 0.0  # stop after this many seconds of training (0 = no budget)
    # evaluate at every multiple of this many training seconds and at the budget, scoring the last state whose
    # training clock is <= the point (rows with eval_point_s in metrics.jsonl; 0 = off)
    eval_every_s: float = 0.0
    eval_at_budget: bool = False  # with eval_every_s = 0: one such evaluation at the budget
    debug_dump: bool = False     # write each rank's gathered scores/advantages to <run>/debug/
    collective_timeout_s: float = 1800.0  # bound on every collective: a rank that dies unannounced stops the rest


@dataclass
class TinyModelConfig:
    """A tiny SD3-architecture pipeline built from scratch (tests, CPU smoke runs)."""
    resolution: int = 32
    latent_channels: int = 4
    vae_block_channels: list = field(default_factory=lambda: [16, 32])
    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    text_hidden: int = 32
    text_layers: int = 1
    tokenizer_max_length: int = 16


@dataclass
class LoraConfig:
    r: int = 32
    alpha: int = 64
    dropout: float = 0.0
    targets: Optional[list] = None  # transformer modules to adapt; null: the family's (its attention projections)


@dataclass
class ModelConfig:
    path: Optional[str] = None   # local diffusers folder (SD3 / SD3.5 / FLUX.1 / Qwen-Image / the shipped default);
    # None -> a tiny random model of model.family built from model.tiny
    # A registered family (sd3, flux, qwen_image: models/) or auto (the folder's model_index.json; a tiny build is
    # SD3 unless this names another family). A folder of another family than the one named here is an error naming
    # the folder and its pipeline class.
    family: str = "auto"
    # Image size in pixels for rollout, training, evaluation and calibration; latent = resolution / VAE factor.
    # None: the transformer's own sample_size (1024 px for SD3.5-Medium).
    resolution: Optional[int] = None
    text_cache_size: int = 4096  # prompt embeddings kept (host-side LRU, pinned on CUDA); copied per batch
    decode_batch: int = 32       # latents per VAE decode call (dense methods decode n (T+1) per batch)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_sequence_length: int = 8  # T5 tokens (zeros when the folder has no T5); SD3.5 uses 256
    lora: LoraConfig = field(default_factory=LoraConfig)
    attention: Literal["sdpa", "xformers"] = "sdpa"
    # torch.compile of the transformer for every phase that runs it (rollout, staircase completions, evaluation,
    # the training forward/backward and the reference pass). "off" runs eagerly; "reduce-overhead" and
    # "max-autotune" add CUDA graphs on a GPU (then the hand-made graphs of sampling.cuda_graphs are not used).
    # The batch dimension is dynamic after the first new shape: one more compile, then no recompiles.
    # "auto": "default" where the run is long enough to pay for compiling (run.epochs at least the threshold, cold or
    # warm compile cache; models.base.resolve_compile), else "off"; off under a wall-clock budget or ZeRO-3.
    compile: Literal["auto", "off", "default", "reduce-overhead", "max-autotune"] = "auto"


@dataclass
class SamplingConfig:
    steps: int = 10
    eval_steps: int = 40
    guidance: float = 4.5
    noise_level: float = 0.7
    variant: Literal["sde", "cps"] = "sde"
    shift: float = 3.0
    # "mean": log-prob averaged over C*H*W (Flow-GRPO reference); "sum": the true Gaussian log-density.
    logprob_reduction: Literal["mean", "sum"] = "mean"
    # CPS log-prob: "faithful" keeps 1/(2 std^2) and the constants; "reference" drops them like the public code.
    cps_logprob: Literal["faithful", "reference"] = "faithful"
    sample_batch: int = 8        # trajectories per forward (per rank); CFG doubles the network batch
    noise_schedule_file: Optional[str] = None  # calibrated per-step noise levels (densegrpo calibrate)
    cuda_graphs: bool = True     # replay the rollout's forwards as CUDA graphs (CUDA, ZeRO stage < 3; no-op on CPU)


@dataclass
class TrainConfig:
    prompts_per_epoch: int = 4
    group_size: int = 4
    micro_batch: int = 8         # samples per training forward (per rank)
    optimizer_steps_per_epoch: int = 1
    lr: float = 3e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    clip_range: float = 1e-4
    beta_kl: float = 0.0
    timestep_fraction: float = 0.99  # train on the first floor(fraction * T) steps
    adv_std: Literal["group", "global"] = "global"
    adv_clip: float = 5.0
    drop_zero_advantage: bool = True
    ema_decay: float = 0.9
    zero_stage: Literal[1, 2, 3] = 2
    # The old policy's log-prob in the ratio: "rollout" stores the sampler's (exact in fp32; the rollout batches
    # rows differently from training, which shows as |rho - 1| > 0 in bf16), "recompute" re-evaluates it in the
    # training batch layout before the first optimizer step (rho = 1 exactly; one extra no-grad forward per pair).
    old_log_prob: Literal["rollout", "recompute"] = "rollout"
    # Gradient through classifier-free guidance: "cond" treats the unconditional branch as a constant (Flow-GRPO's
    # train_sd3.py detaches it) and runs it without autograd, so the backward covers half the rows; "both" also
    # differentiates the unconditional branch (the LoRA acts on it too).
    cfg_grad: Literal["cond", "both"] = "cond"


@dataclass
class RewardConfig:
    weights: dict = field(default_factory=lambda: {"jpeg_compressibility": 1.0})
    # Per-component form (replaces `weights` when given): name -> {weight, type?, path?, device?, batch_size?,
    # dtype?, url?, timeout_s?, retries?, token?}; `type` is the registered reward (default: the name itself).
    components: dict = field(default_factory=dict)
    threads: int = 2             # reward calls run in a thread pool while the next batch samples


@dataclass
class PromptsConfig:
    source: Literal["shapes", "file", "list"] = "list"
    path: Optional[str] = None   # a prompt file (source=file)
    format: Literal["auto", "text", "ocr", "geneval"] = "auto"  # auto: .jsonl/.json -> geneval, else text
    items: list = field(default_factory=lambda: ["a red circle", "a blue square", "a green triangle",
                                                 "a yellow circle"])
    split: Literal["train", "validation", "test"] = "train"


@dataclass
class CreditConfig:
    method: Literal["sparse", "dense", "turning_point", "branching"] = "sparse"
    completion_steps: str = "remaining"  # "remaining" or an integer n (fixed n-step completion)
    # DenseGRPO: score the completions of every s-th step only (Q_0, Q_s, ..., Q_T); each step of a segment gets
    # the segment's gain (s = 1: every step, the paper)
    score_stride: int = 1
    turning_point_constraint: bool = True
    # the constraint's reference: "next" = sign(Q_T - Q_{k+1}), the public TP-GRPO code (the change after step k;
    # the last step is never eligible); "current" = sign(Q_T - Q_k), this project's earlier reading
    turning_point_rule: Literal["next", "current"] = "next"
    turning_point_balance: bool = True
    # balancing when one sign has no turning points: "keep" them all (public code) or "drop" them all
    turning_point_balance_missing: Literal["keep", "drop"] = "keep"
    # DenseGRPO: an exact-zero gain is "normalise"d like any value (the paper) or given advantage "zero"
    zero_gain: Literal["normalise", "zero"] = "normalise"
    branch_steps: list = field(default_factory=lambda: [0, 2, 4, 6])
    branches: int = 4
    noise_aware_weights: bool = False
    # Flow-GRPO-Fast (credit.method=sparse): SDE window length (0 = SDE everywhere). Not for the completion methods
    # (dense, turning_point): outside the window the step is an ODE step, so its gain is exactly zero and the
    # completion from z_k is a copy of the one from z_{k+1} — rejected rather than given a meaning
    window: int = 0
    max_completion_batch: int = 64  # memory cap: network batch per completion forward chunk
    # DenseGRPO's per-step signal: "gain" g_k = Q_{k+1} - Q_k (the paper) or "to_go" Q_T - Q_k (the final reward
    # with the value of z_k as its baseline)
    dense_target: Literal["gain", "to_go"] = "gain"
    # ... normalised per (group, step) (the paper) or "global": centred per (group, step), divided by one std over
    # the batch's centred signals
    dense_norm: Literal["group_step", "global"] = "group_step"
    # train only steps k >= train_from_step (any method): the early steps, where Q_k predicts Q_T poorly, masked
    train_from_step: int = 0


@dataclass
class EvalConfig:
    enabled: bool = False
    split: Literal["train", "validation", "test"] = "test"
    max_prompts: int = 0         # 0 = all
    samples_per_prompt: int = 2
    guidance: float = 4.5
    # samples per ODE batch (CFG doubles the network batch); a batch that does not fit in device memory is halved
    # until it does. The images do not depend on it; the speed does. 0 = auto (eval/sampling.py resolve_eval_batch):
    # 256 on a GPU (as many as fit), 32 on the CPU, where a batch whose activations stay in cache is fastest (the
    # shipped model, one core: 60-64 ms per sample at 8-32, 81 ms at 256; docs/results/eval_batch.md)
    batch: int = 0
    grid: bool = True
    # Evaluation noise of sample j of prompt i is keyed by (eval.seed, i, j) — not by run.seed — so the base model,
    # every method and every training seed are scored on the same images' noise (paired comparisons).
    seed: int = 0
    # a folder: the evaluation before training is stored there under a digest of its inputs (model files, code,
    # settings) and reused by later runs with the same digest ("" = always evaluate; `compare` sets it)
    base_cache: str = ""


@dataclass
class OpsConfig:
    backend: Literal["auto", "torch", "cpp", "triton", "cuda"] = "auto"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    credit: CreditConfig = field(default_factory=CreditConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- validation

_CHECKS = {
    "run.epochs": lambda v: v >= 1, "run.save_every": lambda v: v >= 0, "run.eval_every": lambda v: v >= 0,
    "sampling.steps": lambda v: v >= 2, "sampling.eval_steps": lambda v: v >= 1,
    "sampling.noise_level": lambda v: v >= 0, "sampling.sample_batch": lambda v: v >= 1,
    "sampling.shift": lambda v: v > 0,
    "train.prompts_per_epoch": lambda v: v >= 1, "train.group_size": lambda v: v >= 2,
    "train.micro_batch": lambda v: v >= 1, "train.optimizer_steps_per_epoch": lambda v: v >= 1,
    "train.lr": lambda v: v > 0, "train.clip_range": lambda v: v > 0, "train.beta_kl": lambda v: v >= 0,
    "train.timestep_fraction": lambda v: 0 < v <= 1, "train.adv_clip": lambda v: v > 0,
    "train.ema_decay": lambda v: 0 <= v < 1, "model.lora.r": lambda v: v >= 1,
    "credit.branches": lambda v: v >= 2, "credit.max_completion_batch": lambda v: v >= 1,
    "credit.window": lambda v: v >= 0, "run.collective_timeout_s": lambda v: v > 0,
    "run.eval_every_s": lambda v: v >= 0, "credit.score_stride": lambda v: v >= 1,
    "model.resolution": lambda v: v >= 8, "model.text_cache_size": lambda v: v >= 1,
    "model.decode_batch": lambda v: v >= 1, "credit.train_from_step": lambda v: v >= 0,
    "eval.batch": lambda v: v >= 0,
}


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value is False and "off" in allowed:  # YAML 1.1 reads a bare `off` as false
            value = "off"
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-2" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{where}'; allowed keys{' in ' + prefix if prefix else ''}: "
                              f"{', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], where)
        check = _CHECKS.get(where)
        if check is not None and kwargs[key] is not None and not check(kwargs[key]):
            raise ConfigError(f"{where}: value {value!r} is out of range")
    return cls(**kwargs)


def _semantic_checks(cfg: Config) -> None:
    from .models.registry import family_names  # late import: the registry lives with the models
    if cfg.model.family != "auto" and cfg.model.family not in family_names():
        raise ConfigError(f"model.family: {cfg.model.family!r} is not a registered family; choose one of "
                          f"{', '.join(['auto'] + family_names())}")
    cs = cfg.credit.completion_steps
    if cs != "remaining" and not (cs.isdigit() and int(cs) >= 1):
        raise ConfigError(f"credit.completion_steps: {cs!r} is not allowed; use 'remaining' or a positive integer")
    if cfg.credit.score_stride > 1 and cfg.credit.method != "dense":
        raise ConfigError(f"credit.score_stride: {cfg.credit.score_stride} is for credit.method=dense only "
                          f"(got credit.method={cfg.credit.method}); use 1")
    if len(cfg.train.betas) != 2:
        raise ConfigError("train.betas: expected two numbers [beta1, beta2]")
    for name, w in cfg.reward.weights.items():
        if not isinstance(w, (int, float)):
            raise ConfigError(f"reward.weights.{name}: expected a number, got {w!r}")
    from .rewards import COMPONENT_KEYS, REWARDS  # late import: the registry lives with the rewards
    for name in cfg.reward.weights:
        if name not in REWARDS:
            raise ConfigError(f"reward.weights: unknown reward '{name}'; available: {', '.join(sorted(REWARDS))}")
    if cfg.reward.components:
        if cfg.reward.weights != RewardConfig().weights:
            raise ConfigError("reward.weights and reward.components are both set: give one of them "
                              "(components: name -> {weight: ..., ...})")
        for name, spec in cfg.reward.components.items():
            where = f"reward.components.{name}"
            if not isinstance(spec, dict):
                raise ConfigError(f"{where}: expected a mapping with at least 'weight', got {spec!r}")
            unknown = [k for k in spec if k not in COMPONENT_KEYS]
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(COMPONENT_KEYS)}")
            if not isinstance(spec.get("weight"), (int, float)) or isinstance(spec.get("weight"), bool):
                raise ConfigError(f"{where}.weight: expected a number, got {spec.get('weight')!r}")
            kind = spec.get("type", name)
            if kind not in REWARDS:
                raise ConfigError(f"{where}: unknown reward type '{kind}'; available: {', '.join(sorted(REWARDS))}")
    if cfg.prompts.source == "file" and not cfg.prompts.path:
        raise ConfigError("prompts.path: required when prompts.source is 'file'")
    if cfg.credit.method == "branching":
        import math
        n_train = max(1, int(math.floor(cfg.train.timestep_fraction * cfg.sampling.steps)))
        last = min(cfg.sampling.steps - 2, n_train - 1)
        bad = [k for k in cfg.credit.branch_steps if not (isinstance(k, int) and 0 <= k <= last)]
        if bad:
            raise ConfigError(f"credit.branch_steps: {bad} outside the trained steps 0..{last} (sampling.steps="
                              f"{cfg.sampling.steps}, train.timestep_fraction={cfg.train.timestep_fraction})")
        if cfg.credit.window:
            raise ConfigError("credit.window: the SDE window (Flow-GRPO-Fast) does not apply to credit.method="
                              "'branching' (its SDE steps are credit.branch_steps); set credit.window=0")
    if cfg.credit.window and cfg.credit.method in ("dense", "turning_point"):
        raise ConfigError(f"credit.window: {cfg.credit.window} is for credit.method=sparse (Flow-GRPO-Fast); with "
                          f"credit.method={cfg.credit.method} the steps outside the window are ODE steps whose gains "
                          f"are zero and whose completions repeat the next step's; set credit.window=0 (or use "
                          f"credit.train_from_step / credit.score_stride to train or score fewer steps)")
    if (cfg.credit.dense_target, cfg.credit.dense_norm) != ("gain", "group_step") and cfg.credit.method != "dense":
        raise ConfigError(f"credit.dense_target / credit.dense_norm: apply to credit.method='dense' only (got "
                          f"method '{cfg.credit.method}')")
    if cfg.credit.train_from_step:
        import math
        n_train = max(1, int(math.floor(cfg.train.timestep_fraction * cfg.sampling.steps)))
        if cfg.credit.train_from_step >= n_train:
            raise ConfigError(f"credit.train_from_step: {cfg.credit.train_from_step} leaves no trained step (the "
                              f"trained steps are 0..{n_train - 1})")
    if cfg.model.compile not in ("off", "auto") and cfg.train.zero_stage == 3:
        raise ConfigError("model.compile: not supported with train.zero_stage=3 (ZeRO-3's per-module parameter "
                          "hooks break the compiled graph); use model.compile=off or zero_stage 1/2")
    if cfg.model.path is not None and not os.path.isdir(cfg.model.path):
        raise ConfigError(f"model.path: folder '{cfg.model.path}' does not exist")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() != "" else None


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """YAML file (optional) + `section.key=value` overrides -> validated `Config`."""
    data: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' not found")
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}': top level must be a mapping of sections")
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: '{k}' is not a section")
        node[keys[-1]] = value
    try:
        cfg = _build(Config, data)
    except ConfigError as exc:
        raise ConfigError(f"{path or '<overrides>'}: {exc}") from None
    _semantic_checks(cfg)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    from .utils.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
