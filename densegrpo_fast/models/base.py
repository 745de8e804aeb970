"""The model seam: the `Family` protocol, its registry, the conditioning bundle, the text cache and the container.

Everything outside `models/` sees a model only through this file: `Models` (network, VAE, cached text, latent
geometry, family) and `Cond` (a family's text conditioning, opaque outside it). Latents are (B, C, h, w) everywhere;
a family packs, unpacks or adds a frame axis inside its own `velocity` / `decode`. Adding a family is one file:
a class decorated with `@register_family`, implementing `Family` below, plus its recipes and tests.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, runtime_checkable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelFolderError(FileNotFoundError):
    """A missing or malformed model folder; the message names the folder and what is wrong."""


# ----------------------------------------------------------------------------------------- conditioning

class Cond:
    """A family's text conditioning for B rows: named tensors, each (B, ...), in a fixed order. The CFG negative, where
    the family uses one, is stored under the same names with a `neg_` prefix. Outside the family it is opaque: it can be
    indexed, concatenated and flattened to a tuple (`tensors()` / `from_tensors()`, what a captured graph copies
    into its static inputs)."""
    __slots__ = ("names", "_t")

    def __init__(self, **tensors: torch.Tensor):
        object.__setattr__(self, "names", tuple(tensors))
        object.__setattr__(self, "_t", dict(tensors))

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self._t[name]
        except KeyError:
            raise AttributeError(f"Cond has no field {name!r} (fields: {', '.join(self.names)})") from None

    def __len__(self) -> int:
        return next(iter(self._t.values())).shape[0]

    def tensors(self) -> tuple:
        return tuple(self._t[n] for n in self.names)

    def from_tensors(self, tensors) -> "Cond":
        """A bundle with this one's field names and the given tensors (same order)."""
        return Cond(**dict(zip(self.names, tensors)))

    def index(self, idx) -> "Cond":
        return Cond(**{n: t[idx] for n, t in self._t.items()})

    def positive(self) -> "Cond":
        """The fields without the `neg_` prefix (the prompt's own conditioning)."""
        return Cond(**{n: t for n, t in self._t.items() if not n.startswith("neg_")})

    def negative(self) -> "Cond":
        """The CFG negative under the positive's names."""
        return Cond(**{n[4:]: t for n, t in self._t.items() if n.startswith("neg_")})

    @staticmethod
    def cat(conds: list) -> "Cond":
        names = conds[0].names
        return Cond(**{n: torch.cat([c._t[n] for c in conds]) for n in names})

    def with_negative(self, neg: "Cond") -> "Cond":
        """This bundle plus `neg` (1 row, broadcast to every row) under `neg_` names."""
        n = len(self)
        extra = {"neg_" + k: t.expand(n, *t.shape[1:]) for k, t in zip(neg.names, neg.tensors())}
        return Cond(**self._t, **extra)


def cfg_velocity(forward: Callable, z: torch.Tensor, sigma: torch.Tensor, cond: Cond, grad_uncond: bool,
                 combine: Callable) -> torch.Tensor:
    """Classifier-free guidance from a [uncond; cond] pair of forwards: combine(v_u, v_c).

    forward(z, sigma, cond) -> v; cond carries `neg_` fields. grad_uncond=False: the unconditional branch runs as its own
    no-grad forward (a constant for autograd, half the rows in the backward); otherwise one batched forward over
    [uncond; cond]. Both layouts are kept whether or not autograd records, so a no-grad recompute reproduces the
    training forward exactly."""
    pos, neg = cond.positive(), cond.negative()
    if not grad_uncond:
        with torch.no_grad():
            vu = forward(z, sigma, neg)
        return combine(vu, forward(z, sigma, pos))
    out = forward(torch.cat([z, z]), torch.cat([sigma, sigma]), Cond.cat([neg, pos]))
    vu, vc = out.chunk(2)
    return combine(vu, vc)


# ----------------------------------------------------------------------------------------- the protocol

@runtime_checkable
class Family(Protocol):
    """What a model family owns. Shapes: z (B, C, h, w) fp32 (fp64 in exactness tests), sigma (B,) in [0, 1]."""
    name: str                 # model.family
    pipeline_class: str       # the diffusers pipeline (model_index.json's _class_name; load_lora_weights)
    required: tuple           # the folder's components
    lora_targets: tuple       # default LoRA target modules of the transformer

    def from_pretrained(self, path: str, dtype: torch.dtype):
        """The pipeline from a local diffusers folder, offline; errors name the folder."""

    def build_tiny(self, folder: str, words: list, spec, seed: int = 0):
        """Write a randomly initialised tiny pipeline of this architecture to `folder`; returns it."""

    def bind(self, pipe) -> None:
        """Read what the calls need from the loaded pipeline (configs; the caller may later wrap the transformer)."""

    def text_encoders(self, pipe) -> list:
        ...

    def encode(self, pipe, prompts: list, max_sequence_length: int, device) -> Cond:
        """N prompts -> the positive conditioning (N rows), fixed shapes per row so that rows of any prompts stack."""

    def velocity(self, transformer, z: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float,
                 grad_uncond: bool = True) -> torch.Tensor:
        """The guided velocity (B, C, h, w) in the transformer's dtype: the timestep convention and the guidance rule
        (CFG, guidance embedding, true CFG with rescale) live here."""

    def nfe_per_sample(self, guidance: float) -> int:
        """Network evaluations per sample per step at this guidance (CFG: 2)."""

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], with this family's VAE normalisation."""

    def vae_factor(self, vae) -> int:
        """Pixels per latent cell."""

    def latent_shape(self, transformer, vae, resolution: Optional[int]) -> tuple:
        """(C, h, w) for `resolution` pixels (None: the model's native size); errors name model.resolution."""

    def sigmas(self, steps: int, shift: float, latent_shape: tuple, scheduler_config=None,
               device="cpu") -> torch.Tensor:
        """The sampler's sigma table (steps + 1,) fp32, ending at 0, as the family's pipeline builds it."""

    def plan_geometry(self, transformer_config: dict, vae_config: dict, resolution: Optional[int],
                      max_sequence_length: int, guidance: float) -> dict:
        """What `densegrpo plan` needs without weights: resolution, latent side, image tokens, text tokens, rows per
        sample per forward."""


FAMILIES: dict = {}            # name -> Family class
PIPELINE_CLASSES: dict = {}    # diffusers pipeline class name -> family name


def register_family(cls):
    """Class decorator: make a family available as model.family=<cls.name>."""
    FAMILIES[cls.name] = cls
    PIPELINE_CLASSES[cls.pipeline_class] = cls.name
    return cls


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens (FluxPipeline._pack_latents and QwenImagePipeline._pack_latents)."""
    B, C, h, w = z.shape
    return z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of pack."""
    B, _, D = x.shape
    return x.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, h, w)


def load_local_pipeline(pipeline_class: str, path: str, dtype: torch.dtype, **kwargs):
    """<pipeline_class>.from_pretrained(path) from a local folder, offline. The folder's model_index.json must name
    that class (diffusers would otherwise fill one pipeline with another family's parts); every failure is a
    ModelFolderError naming the folder and the class."""
    import diffusers
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    where = f"model folder '{path}' could not be loaded as a {pipeline_class}"
    try:
        with open(os.path.join(path, "model_index.json")) as f:
            found = json.load(f).get("_class_name")
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{where}: cannot read model_index.json ({type(exc).__name__}: {exc})") from exc
    if found != pipeline_class:
        raise ModelFolderError(f"{where}: its model_index.json names {found!r} (model.family / model.path)")
    try:
        return getattr(diffusers, pipeline_class).from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
    except Exception as exc:
        raise ModelFolderError(f"{where}: {type(exc).__name__}: {exc}") from exc


def scaled_vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """SD3 / FLUX's VAE convention, z = (latent - shift_factor) * scaling_factor: latents (B, C, h, w) -> images
    (B, 3, H, W) in [0, 1]."""
    cfg = vae.config
    img = vae.decode(latents.to(vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0), return_dict=False)[0]
    return ((img.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell of a diffusers VAE: 2^(number of down blocks - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def square_latent(channels: int, resolution: int, factor: int, patch: int,
                  max_patches: Optional[int] = None) -> tuple:
    """(C, s, s) latents for `resolution` px; errors name model.resolution and what it must divide by."""
    if resolution % (factor * patch):
        raise ValueError(f"model.resolution={resolution}: must be a multiple of VAE factor x patch size = "
                         f"{factor} x {patch} = {factor * patch} (latent = resolution / {factor}, split into "
                         f"{patch}x{patch} patches)")
    s = resolution // factor
    if max_patches is not None and s // patch > max_patches:
        raise ValueError(f"model.resolution={resolution}: {s // patch} patches per side exceed the transformer's "
                         f"pos_embed_max_size={max_patches} (at most {max_patches * patch * factor} px)")
    return (channels, s, s)


# ----------------------------------------------------------------------------------------- text cache

@dataclass
class PromptEncoder:
    """Text conditioning computed once per prompt, kept in a bounded host-side LRU cache (pinned memory on CUDA) and
    copied to the device per batch: device memory holds one batch, whatever the prompt file's size. The text encoders
    never run in the training loop for a cached prompt.

    Each new prompt is encoded alone (a batch of one). A prompt's conditioning is then a function of the prompt only:
    batched GEMMs pick kernels by the batch's row count (oneDNN / MKL on AVX-512 do), so encoding new prompts together
    made a prompt's last bits depend on which other prompts were new at the same time, and that differs after a
    restart, a cache eviction, another rank count or another prompts_per_epoch. The cost is one text-encoder call per
    distinct prompt, paid once while the prompt stays cached."""
    pipe: object
    max_sequence_length: int
    device: torch.device
    dtype: torch.dtype
    family: Family
    cache_size: int = 4096
    _cache: "OrderedDict" = field(default_factory=OrderedDict)
    _negative: Optional[Cond] = None

    def encode_with_grad(self, prompts: list) -> Cond:
        """Uncached and differentiable (pretraining trains the text encoders)."""
        c = self.family.encode(self.pipe, prompts, self.max_sequence_length, self.device)
        return Cond(**{n: (t.to(self.dtype) if t.is_floating_point() else t) for n, t in zip(c.names, c.tensors())})

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu", copy=True)
        return t.pin_memory() if torch.cuda.is_available() else t

    def __len__(self) -> int:
        """Prompts held in the cache."""
        return len(self._cache)

    def encode(self, prompts: list) -> Cond:
        """N prompts -> their positive conditioning (N rows) on the device."""
        rows = {}
        for p in dict.fromkeys(prompts):
            if p in self._cache:
                self._cache.move_to_end(p)
                rows[p] = self._cache[p]
        for p in [p for p in dict.fromkeys(prompts) if p not in rows]:
            with torch.no_grad():
                c = self.encode_with_grad([p])
            rows[p] = c.from_tensors(self._to_host(t[0]) for t in c.tensors())
            self._cache[p] = rows[p]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        first = rows[prompts[0]]
        return first.from_tensors(self._gather([rows[p].tensors()[i] for p in prompts])
                                  for i in range(len(first.names)))

    def conditioning(self, prompts: list) -> Cond:
        """N prompts -> the conditioning a sampler takes: the prompts' rows with the CFG negative (the empty prompt,
        encoded once and kept on the device)."""
        if self._negative is None:
            self._negative = self.encode([""])
        return self.encode(prompts).with_negative(self._negative)

    def _gather(self, parts: list) -> torch.Tensor:
        """Host rows -> one (N, ...) device tensor. On CUDA each pinned row is copied asynchronously straight into the
        device tensor (stacking on the host first would land in pageable memory and make the copy synchronous)."""
        if self.device.type != "cuda":
            return torch.stack(parts).to(self.device)
        out = torch.empty((len(parts), *parts[0].shape), dtype=parts[0].dtype, device=self.device)
        for i, t in enumerate(parts):
            out[i].copy_(t, non_blocking=True)
        return out


# ----------------------------------------------------------------------------------------- the container

@dataclass
class Models:
    """What the trainer needs from a pipeline: the transformer, the VAE, the cached text, latent geometry, family."""
    pipe: object
    transformer: torch.nn.Module
    vae: torch.nn.Module
    text: PromptEncoder
    latent_shape: tuple   # (C, h, w)
    dtype: torch.dtype
    family: Family
    decode_batch: int = 32

    @property
    def resolution(self) -> int:
        return self.latent_shape[-1] * self.family.vae_factor(self.vae)

    def sigmas(self, steps: int, shift: float, device="cpu") -> torch.Tensor:
        """The family's sigma table for this model's latents (steps + 1,) fp32."""
        return self.family.sigmas(steps, shift, self.latent_shape, self.pipe.scheduler.config, device=device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B,C,h,w) -> images (B,3,H,W) float in [0,1], decoded decode_batch latents at a time."""
        out = [self.family.decode(self.vae, latents[s:s + self.decode_batch])
               for s in range(0, latents.shape[0], self.decode_batch)]
        return torch.cat(out) if out else torch.empty(0, 3, self.resolution, self.resolution)


def models_from_pipe(pipe, device, dtype, max_sequence_length: int, family: Family, resolution: Optional[int] = None,
                     text_cache_size: int = 4096, decode_batch: int = 32) -> Models:
    pipe.to(device)
    for m in [pipe.vae] + family.text_encoders(pipe):
        m.requires_grad_(False)
        m.eval()
    family.bind(pipe)
    text = PromptEncoder(pipe, max_sequence_length, torch.device(device), dtype, family, text_cache_size)
    return Models(pipe=pipe, transformer=pipe.transformer, vae=pipe.vae, text=text,
                  latent_shape=family.latent_shape(pipe.transformer, pipe.vae, resolution), dtype=dtype,
                  family=family, decode_batch=decode_batch)


# ----------------------------------------------------------------------------------------- compile

def compile_cache_dir(transformer) -> str:
    """Where torch's compile caches (inductor's FX graph cache, the AOT autograd cache) persist between runs:
    $DENSEGRPO_COMPILE_CACHE (default ~/.cache/densegrpo/compile) / torch-<version> / <digest of the transformer's
    config>. Inside, inductor keys every graph by its code, input shapes and settings, so a changed model, shape set
    or torch version compiles anew and nothing stale is reused."""
    root = os.environ.get("DENSEGRPO_COMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "densegrpo",
                                                                     "compile")
    cfg = dict(getattr(transformer, "config", None) or {"module": type(transformer).__qualname__})
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    return os.path.join(root, f"torch-{torch.__version__}", digest[:16])


# The rule of model.compile=auto, in epochs. warm: the break-even of a run whose graphs are in the compile cache
# (the shipped tiny SD3, configs/shapes_default.yaml, 64 trajectories per epoch, one CPU core: loading them adds
# 30-36 s to the first epoch and each later epoch saves 3-6 s; docs/performance.md). cold: a policy, not a single
# run's break-even. Compiling the graphs the first time costs about 300 s on one core (2-5 min by machine) against
# the same 3-6 s saved per epoch, so a one-off run breaks even only after 50-120 epochs; but the graphs persist
# (compile_cache_dir), so a cold compile is paid once per machine, model and torch version: at 31 epochs or more, a
# first run's loss is repaid by its first warm rerun or two (make train's 36 epochs, training seconds against
# compile off: first run +214 s, second run -191 s).
COMPILE_BREAK_EVEN_EPOCHS = {"cold": 31, "warm": 8}


def inductor_cache_dir(transformer) -> str:
    """The folder compile_transformer hands inductor: $TORCHINDUCTOR_CACHE_DIR when the user set it to a folder of
    their own, else compile_cache_dir. torch itself writes its default folder (/tmp/torchinductor_<user>) into
    that variable the first time anything compiles, so the default does not count as the user's choice."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    d = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return compile_cache_dir(transformer) if d in (None, os.path.abspath(default_cache_dir())) else d


def compile_cache_is_warm(transformer) -> bool:
    """Whether this transformer's compile cache folder already holds compiled graphs (an earlier run compiled it)."""
    d = inductor_cache_dir(transformer)
    return os.path.isdir(d) and any(files for _, _, files in os.walk(d))


def resolve_compile(mode: str, transformer, epochs: int, budget_s: float = 0.0, zero_stage: int = 2,
                    agree_cold=None) -> tuple:
    """model.compile -> (the mode to run, why). auto: "default" when epochs >= the threshold for the state of the
    compile cache (COMPILE_BREAK_EVEN_EPOCHS: warm when an earlier run compiled this transformer), else "off";
    always "off" under a wall-clock budget (the compile would be paid inside the budget, differently per method)
    and with ZeRO-3 (its parameter hooks break the graph). agree_cold(flag) -> bool: on several ranks, whether any
    rank's cache is cold (train.distributed.agree_any), so that every rank makes the same choice."""
    if mode != "auto":
        return mode, "set"
    if zero_stage == 3:
        return "off", "ZeRO-3"
    if budget_s:
        return "off", "a wall-clock budget (compile time would count inside it)"
    cold = not compile_cache_is_warm(transformer)
    state = "cold" if (agree_cold(cold) if agree_cold else cold) else "warm"
    need = COMPILE_BREAK_EVEN_EPOCHS[state]
    if epochs >= need:
        return "default", f"{epochs} epochs >= {need}, the threshold with a {state} compile cache"
    return "off", f"{epochs} epochs < {need}, the threshold with a {state} compile cache"


def compile_transformer(transformer, mode: str) -> None:
    """torch.compile the transformer in place (module.compile: every caller, DeepSpeed's engine included, runs the
    compiled forward). mode: off | default | reduce-overhead | max-autotune. dynamic=None: the first new batch size
    recompiles once with a dynamic batch dimension, later sizes reuse that graph. The compiled graphs are kept in
    compile_cache_dir (unless TORCHINDUCTOR_CACHE_DIR names another folder): a later run of the same model, shapes
    and torch loads them instead of compiling."""
    if mode == "off":
        return
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir(transformer)
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    transformer.compile(mode=None if mode == "default" else mode, dynamic=None)
