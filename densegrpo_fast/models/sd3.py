"""SD3-architecture pipelines: load from a local diffusers folder, or build a tiny one; LoRA; cached text embeddings.

The same `load_sd3` call loads SD3.5-Medium, the project's shipped default (assets/shapes_sd3_tiny) and a tiny
folder written by `build_tiny_sd3`; nothing is ever fetched from a hub.
"""
from __future__ import annotations

import json
import os
import string
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelFolderError(FileNotFoundError):
    """A missing or malformed model folder; the message names the folder and what is wrong."""


# ----------------------------------------------------------------------------------------- tiny tokenizer

def write_clip_tokenizer(folder: str, words: list[str], max_length: int) -> None:
    """A CLIP BPE tokenizer that spells every word of `words` (lower-case letters and digits) as one token.

    vocab: every letter, every letter+'</w>', and every token the merges make. merges: learnt the way BPE is trained
    (merge the most frequent adjacent pair over the word list, ties by the pair's text, until every word is one
    token), so applying them by rank, as the tokenizer does, rebuilds each word whole. (Merging each word's prefixes
    in turn does not: "and"'s a+n merge ranks before "triangle"'s and splits it into six tokens.) Unknown characters
    map to <unk>.
    """
    os.makedirs(folder, exist_ok=True)
    letters = list(string.ascii_lowercase + string.digits)
    vocab: dict[str, int] = {}

    def add(tok):
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for ch in letters:
        add(ch)
    for ch in letters:
        add(ch + "</w>")
    merges: list[str] = []
    spelt = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words)) if w]
    while True:
        counts: dict[tuple[str, str], int] = {}
        for sym in spelt:
            for pair in zip(sym, sym[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pr: (-counts[pr], pr))
        merges.append(f"{best[0]} {best[1]}")
        add(best[0] + best[1])
        for k, sym in enumerate(spelt):
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            spelt[k] = out
    for special in ("<unk>", "<|startoftext|>", "<|endoftext|>"):
        add(special)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
           "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>",
           "do_lower_case": True}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f)


# ----------------------------------------------------------------------------------------- build / load

def build_tiny_sd3(folder: str, words: list[str], spec, seed: int = 0, vae_scaling: float = 1.0,
                   vae_shift: float = 0.0):
    """Write a randomly initialised tiny SD3 pipeline (diffusers format) to `folder`; returns the pipeline.

    spec: config.TinyModelConfig. Image `resolution`, VAE downsampling 2^(len(vae_block_channels)-1),
    MMDiT with patch 2, two CLIP text encoders (no T5: SD3 pads with zeros).
    """
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = os.path.join(folder, "_tok")
    write_clip_tokenizer(tok_dir, words, spec.tokenizer_max_length)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir)
    vocab_size = len(tokenizer.get_vocab())

    def text_encoder():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=2 * spec.text_hidden,
            num_hidden_layers=max(spec.text_layers, 2), num_attention_heads=2,
            max_position_embeddings=spec.tokenizer_max_length, projection_dim=spec.text_hidden,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))

    n_down = len(spec.vae_block_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n_down,
                        up_block_types=["UpDecoderBlock2D"] * n_down, block_out_channels=list(spec.vae_block_channels),
                        latent_channels=spec.latent_channels, layers_per_block=1,
                        norm_num_groups=min(8, spec.vae_block_channels[0]), sample_size=spec.resolution,
                        scaling_factor=vae_scaling, shift_factor=vae_shift, use_quant_conv=False,
                        use_post_quant_conv=False)
    latent = spec.resolution // 2 ** (n_down - 1)
    inner = spec.num_attention_heads * spec.attention_head_dim
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=spec.latent_channels, num_layers=spec.num_layers,
        attention_head_dim=spec.attention_head_dim, num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=2 * spec.text_hidden, caption_projection_dim=inner,
        pooled_projection_dim=2 * spec.text_hidden, out_channels=spec.latent_channels,
        pos_embed_max_size=max(latent, 16))  # sin-cos table (no weights): room for 2x the built resolution
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder(), tokenizer=tokenizer, text_encoder_2=text_encoder(), tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    import shutil
    shutil.rmtree(tok_dir, ignore_errors=True)
    return pipe


def check_model_folder(path: str, family: str = "sd3") -> None:
    """The folder exists, holds the family's components and its model_index.json names that family's pipeline."""
    from .family import FAMILIES, family_of_folder
    if not os.path.isdir(path):
        raise ModelFolderError(f"model folder '{path}' does not exist (model.path)")
    fam = FAMILIES[family]
    missing = [p for p in fam.required if not os.path.exists(os.path.join(path, p))]
    if missing:
        raise ModelFolderError(f"model folder '{path}' is not a diffusers {fam.pipeline_class} folder: missing "
                               f"{', '.join(missing)}")
    found = family_of_folder(path)
    if found != family:
        raise ModelFolderError(f"model folder '{path}' holds a {FAMILIES[found].pipeline_class} (model_index.json), "
                               f"but model.family is '{family}' ({fam.pipeline_class}); set model.family={found} "
                               f"or auto")


def load_sd3(path: str, dtype: torch.dtype = torch.float32):
    """StableDiffusion3Pipeline.from_pretrained(path) from a local folder, offline, with clear errors."""
    from diffusers import StableDiffusion3Pipeline
    check_model_folder(path, "sd3")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    # A folder without T5 (the tiny and shipped models): SD3 then pads the text sequence with zeros.
    absent = {k: None for k in ("text_encoder_3", "tokenizer_3") if index.get(k) in (None, [None, None])}
    try:
        return StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype, local_files_only=True, **absent)
    except Exception as exc:
        raise ModelFolderError(f"model folder '{path}' could not be loaded: {type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------------------- LoRA

def add_lora(transformer, lora_cfg, seed: int = 0):
    """LoRA (peft) on the joint-attention projections; base weights frozen. Returns the trainable parameters."""
    from peft import LoraConfig
    transformer.requires_grad_(False)
    names = {n for n, _ in transformer.named_modules()}
    if not any(n.endswith("." + t) or n == t for t in lora_cfg.targets for n in names):
        raise ValueError(f"model.lora.targets: none of {lora_cfg.targets} match a module of the transformer")
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                                       init_lora_weights="gaussian", target_modules=list(lora_cfg.targets)))
    return [p for p in transformer.parameters() if p.requires_grad]


@contextmanager
def adapter_disabled(transformer):
    """The reference policy: the same network with the LoRA adapter switched off."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def lora_state_dict(transformer) -> dict:
    from peft.utils import get_peft_model_state_dict
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def lora_metadata(transformer) -> dict:
    """The adapter's LoraConfig as a dict (r, lora_alpha, targets): saved beside the weights so that
    load_lora_weights restores the scale alpha/r instead of assuming alpha = r."""
    return transformer.peft_config["default"].to_dict()


def save_lora(folder: str, state_dict: dict, metadata: Optional[dict] = None, family: str = "sd3") -> None:
    """diffusers format: loads with the family's pipeline, e.g. StableDiffusion3Pipeline.load_lora_weights(folder) or
    FluxPipeline.load_lora_weights(folder)."""
    import diffusers
    from .family import FAMILIES
    if metadata is not None:
        metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    getattr(diffusers, FAMILIES[family].pipeline_class).save_lora_weights(folder, transformer_lora_layers=state_dict,
                                               transformer_lora_adapter_metadata=metadata)


# ----------------------------------------------------------------------------------------- text embeddings

@dataclass
class PromptEncoder:
    """Text embeddings computed once per prompt, kept in a bounded host-side LRU cache (pinned memory on CUDA) and
    copied to the device per batch: device memory holds one batch of embeddings, whatever the prompt file's size.
    The text encoders never run in the training loop for a cached prompt.

    Each new prompt is encoded alone (a batch of one). A prompt's embedding is then a function of the prompt only:
    batched GEMMs pick kernels by the batch's row count (oneDNN / MKL on AVX-512 do), so encoding new prompts
    together made a prompt's last bits depend on which other prompts were new at the same time, and that differs
    after a restart, a cache eviction, another rank count or another prompts_per_epoch. The cost is one text-encoder
    call per distinct prompt, paid once while the prompt stays cached."""
    pipe: object
    max_sequence_length: int
    device: torch.device
    dtype: torch.dtype
    cache_size: int = 4096
    family: object = None        # models.family.*Family (None: SD3)
    _cache: "OrderedDict" = field(default_factory=OrderedDict)

    def _encode_with_grad(self, prompts: list[str]):
        """Uncached and differentiable (pretraining trains the text encoders)."""
        from .family import SD3Family
        pe, pooled = (self.family or SD3Family()).encode(self.pipe, prompts, self.max_sequence_length, self.device)
        return pe.to(self.dtype), pooled.to(self.dtype)

    def _encode_uncached(self, prompts: list[str]):
        with torch.no_grad():
            return self._encode_with_grad(prompts)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu", copy=True)
        return t.pin_memory() if torch.cuda.is_available() else t

    def __len__(self) -> int:
        """Prompts held in the cache."""
        return len(self._cache)

    def encode(self, prompts: list[str]):
        """list of N prompts -> embeds (N, S, D), pooled (N, P) on the device."""
        rows = {}
        for p in dict.fromkeys(prompts):
            if p in self._cache:
                self._cache.move_to_end(p)
                rows[p] = self._cache[p]
        for p in [p for p in dict.fromkeys(prompts) if p not in rows]:
            pe, pooled = self._encode_uncached([p])
            rows[p] = (self._to_host(pe[0]), self._to_host(pooled[0]))
            self._cache[p] = rows[p]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return self._gather([rows[p][0] for p in prompts]), self._gather([rows[p][1] for p in prompts])

    def _gather(self, parts: list) -> torch.Tensor:
        """Host rows -> one (N, ...) device tensor. On CUDA each pinned row is copied asynchronously straight into
        the device tensor (stacking on the host first would land in pageable memory and make the copy synchronous)."""
        if self.device.type != "cuda":
            return torch.stack(parts).to(self.device)
        out = torch.empty((len(parts), *parts[0].shape), dtype=parts[0].dtype, device=self.device)
        for i, t in enumerate(parts):
            out[i].copy_(t, non_blocking=True)
        return out


@dataclass
class SD3Models:
    """What the trainer needs from a pipeline: the transformer, the VAE, the cached text encoder, latent geometry."""
    pipe: object
    transformer: torch.nn.Module
    vae: torch.nn.Module
    text: PromptEncoder
    latent_shape: tuple   # (C, h, w)
    dtype: torch.dtype
    decode_batch: int = 32
    family: object = None  # models.family.SD3Family / FluxFamily: how the network is called (None: SD3)

    @property
    def resolution(self) -> int:
        return self.latent_shape[-1] * vae_scale_factor(self.vae)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B,C,h,w) -> images (B,3,H,W) float in [0,1], decoded decode_batch latents at a time."""
        cfg = self.vae.config
        out = []
        for s in range(0, latents.shape[0], self.decode_batch):
            z = latents[s:s + self.decode_batch].to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            img = self.vae.decode(z, return_dict=False)[0]
            out.append(((img.float() + 1.0) / 2.0).clamp(0.0, 1.0))
        return torch.cat(out) if out else torch.empty(0, 3, self.resolution, self.resolution)


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape_for(transformer, vae, resolution: Optional[int], family=None) -> tuple:
    """(C, h, w) of the latents for `resolution` pixels (None: the model's native size). Errors name
    model.resolution and what it must divide by."""
    from .family import SD3Family
    family = family or SD3Family()
    c = vae.config.latent_channels
    if resolution is None:
        s = family.default_latent(transformer, vae)
        return (c, s, s)
    f = vae_scale_factor(vae)
    patch = family.patch(transformer)
    if resolution % (f * patch):
        raise ValueError(f"model.resolution={resolution}: must be a multiple of VAE factor x patch size = "
                         f"{f} x {patch} = {f * patch} (latent = resolution / {f}, split into {patch}x{patch} patches)")
    s = resolution // f
    pmax = family.max_patches(transformer)
    if pmax is not None and s // patch > pmax:
        raise ValueError(f"model.resolution={resolution}: {s // patch} patches per side exceed the transformer's "
                         f"pos_embed_max_size={pmax} (at most {pmax * patch * f} px)")
    return (c, s, s)


def compile_cache_dir(transformer) -> str:
    """Where torch's compile caches (inductor's FX graph cache, the AOT autograd cache) persist between runs:
    $DENSEGRPO_COMPILE_CACHE (default ~/.cache/densegrpo/compile) / torch-<version> / <digest of the transformer's
    config>. Inside, inductor keys every graph by its code, input shapes and settings, so a changed model, shape set
    or torch version compiles anew and nothing stale is reused."""
    import hashlib
    root = os.environ.get("DENSEGRPO_COMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "densegrpo",
                                                                     "compile")
    cfg = dict(getattr(transformer, "config", None) or {"module": type(transformer).__qualname__})
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    return os.path.join(root, f"torch-{torch.__version__}", digest[:16])


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
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir(transformer)
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    transformer.compile(mode=None if mode == "default" else mode, dynamic=None)


def models_from_pipe(pipe, device, dtype, max_sequence_length: int, resolution: Optional[int] = None,
                     text_cache_size: int = 4096, decode_batch: int = 32, family=None) -> SD3Models:
    from .family import SD3Family
    family = family or SD3Family()
    pipe.to(device)
    for m in [pipe.vae] + family.text_encoders(pipe):
        m.requires_grad_(False)
        m.eval()
    tr = pipe.transformer
    family.bind(tr)
    text = PromptEncoder(pipe, max_sequence_length, torch.device(device), dtype, text_cache_size, family=family)
    return SD3Models(pipe=pipe, transformer=tr, vae=pipe.vae, text=text,
                     latent_shape=latent_shape_for(tr, pipe.vae, resolution, family), dtype=dtype,
                     decode_batch=decode_batch, family=family)


def load_pipeline(path: str, family: str, dtype: torch.dtype = torch.float32):
    """The family's pipeline from a local diffusers folder (SD3: load_sd3, FLUX: load_flux)."""
    check_model_folder(path, family)
    if family == "flux":
        from .flux import load_flux
        return load_flux(path, dtype)
    return load_sd3(path, dtype)


def resolve_family(model_cfg) -> str:
    """model.family, with auto = the folder's model_index.json (a tiny build is SD3 unless model.family says)."""
    from .family import family_of_folder
    if model_cfg.family != "auto":
        return model_cfg.family
    if model_cfg.path is not None:
        if not os.path.isdir(model_cfg.path):
            raise ModelFolderError(f"model folder '{model_cfg.path}' does not exist (model.path)")
        return family_of_folder(model_cfg.path)
    return "sd3"


def build_models(model_cfg, device, words: Optional[list[str]] = None, work_dir: Optional[str] = None,
                 seed: int = 0) -> SD3Models:
    from .family import get_family
    dtype = DTYPES[model_cfg.dtype]
    name = resolve_family(model_cfg)
    if model_cfg.path is not None:
        pipe = load_pipeline(model_cfg.path, name, dtype)
    else:
        folder = os.path.join(work_dir or ".", "tiny_model")
        if not os.path.exists(os.path.join(folder, "model_index.json")):
            if name == "flux":
                from .flux import build_tiny_flux
                build_tiny_flux(folder, words or [], model_cfg.tiny, seed=seed)
            else:
                build_tiny_sd3(folder, words or [], model_cfg.tiny, seed=seed)
        pipe = load_pipeline(folder, name, dtype)
    if model_cfg.attention == "xformers":
        try:
            pipe.enable_xformers_memory_efficient_attention()
        except Exception as exc:
            raise RuntimeError(f"model.attention=xformers: xformers unavailable ({exc}); use 'sdpa'") from exc
    return models_from_pipe(pipe, device, dtype, model_cfg.max_sequence_length, model_cfg.resolution,
                            model_cfg.text_cache_size, model_cfg.decode_batch, get_family(name))
