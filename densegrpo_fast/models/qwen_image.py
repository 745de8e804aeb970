"""Qwen-Image (QwenImagePipeline): a 60-block MMDiT on 2x2-packed latents with 3-axis rotary positions, a Qwen2.5-VL
text encoder behind a chat prompt template, the Wan-style causal 3D VAE with per-channel latent statistics, true CFG
with the norm rescale, and a schedule shifted by the image sequence length (FLUX's mu, Qwen's constants, a terminal
stretch to shift_terminal).

A tiny Qwen-Image built from configs (tests, CPU runs) loads through the same `QwenImagePipeline.from_pretrained(local
folder)` call as a real Qwen/Qwen-Image checkpoint; nothing is fetched from a hub. Latents stay (B, C, h, w) outside
this file: packing into (B, h/2 * w/2, 4C) tokens and the frame axis of the VAE live in `velocity` / `decode`.

The text conditioning is `Cond(embeds (N, L, D), mask (N, L))` at a fixed L = model.max_sequence_length: the prompt's
hidden states after the template prefix (as `QwenImagePipeline.encode_prompt`), zero-padded, mask 0 on padding. The
transformer honours the mask (padded keys are masked out of the joint attention and the text rotary positions do not
depend on L), so a prompt's velocity is the same at any L that holds it.
"""
from __future__ import annotations

import math
import os
import shutil
from typing import Optional

import numpy as np
import torch

from .base import (Cond, cfg_velocity, load_local_pipeline, pack, register_family, square_latent,
                   unpack)
from .tokenizers import learn_bpe_merges

# The attention projections of QwenImageTransformerBlock (image stream to_*, text stream add_*_proj / to_add_out).
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

# QwenImagePipeline.__init__'s prompt_template_encode and prompt_template_encode_start_idx: the Qwen2 tokenizer spells
# the system part (up to and including "user\n") as 34 tokens, which encode_prompt drops from the hidden states.
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
TEMPLATE_START_IDX = 34
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# Qwen/Qwen-Image scheduler/scheduler_config.json
SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                        max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                        stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                        use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)

DEFAULT_SAMPLE_SIZE = 128   # QwenImagePipeline.default_sample_size (latent cells): 1024 px with the 8x VAE
SAMPLE_SIZE_KEY = "_sample_size"  # a tiny build's latent side, kept in its transformer config (private: no warning)


# ----------------------------------------------------------------------------------------- tiny build

def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table (byte-level BPE, as Qwen2's tokenizer)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_qwen2_tokenizer(folder: str, words: list[str], max_length: int = 32768):
    """A byte-level BPE Qwen2 tokenizer (Qwen2's pre-tokenizer regex, NFC, byte-level) whose merges spell every word of
    the prompt template and of `words` (with and without a leading space) as one token; any other text falls back to
    the 256 byte tokens. The chat and vision special tokens exist as special tokens. Merges are learnt as BPE trains
    (most frequent adjacent pair first, ties by the pair's text) until every such word is one token, so the tokenizer,
    applying them by rank, rebuilds each word whole. Saved with save_pretrained; -> the tokenizer."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: i for i, b in enumerate(range(256))}
    pre = Qwen2Tokenizer(vocab=dict(vocab), merges=[])._tokenizer.pre_tokenizer
    text = PROMPT_TEMPLATE.format("")
    for s in SPECIAL_TOKENS:
        text = text.replace(s, " \x00 ")
    pieces = [p for seg in text.split("\x00") for p, _ in pre.pre_tokenize_str(seg.strip(" "))]
    for w in sorted(set(words)):
        if w:
            pieces += [p for p, _ in pre.pre_tokenize_str(w)] + [p for p, _ in pre.pre_tokenize_str(" " + w)]
    spelt = [list(p) for p in sorted(set(pieces)) if len(p) > 1]
    merges = learn_bpe_merges(spelt)
    for x, y in merges:
        vocab.setdefault(x + y, len(vocab))
    for s in SPECIAL_TOKENS:
        vocab.setdefault(s, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=max_length)
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS], special_tokens=True)
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    n = len(tok(prefix).input_ids)
    if n != TEMPLATE_START_IDX:  # encode_prompt drops exactly 34 tokens: the template must tokenise as Qwen2's does
        raise RuntimeError(f"tiny Qwen2 tokenizer spells the prompt template prefix as {n} tokens, not "
                           f"{TEMPLATE_START_IDX}")
    tok.save_pretrained(folder)
    return tok


def _tiny_text_encoder(tokenizer, spec):
    """A tiny Qwen2_5_VLForConditionalGeneration (text model + a one-block vision tower) over `tokenizer`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    heads = 2
    head_dim = spec.text_hidden // heads
    half = head_dim // 2                                  # mrope sections (temporal, h, w) sum to head_dim / 2
    sec = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=2 * spec.text_hidden,
                num_hidden_layers=max(spec.text_layers, 1), num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=2048, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": sec},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=spec.text_hidden,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[0], tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    return Qwen2_5_VLForConditionalGeneration(cfg)


def build_tiny_qwen_image(folder: str, words: list[str], spec, seed: int = 0):
    """Write a randomly initialised tiny Qwen-Image pipeline (diffusers format) to `folder`; returns the pipeline.

    spec: config.TinyModelConfig. VAE: AutoencoderKLQwenImage with base_dim vae_block_channels[0], downsampling
    2^(len(vae_block_channels)-1) (2 ** len(temperal_downsample)), z_dim latent_channels and per-channel
    latents_mean / latents_std; the transformer takes 2x2-packed latents (in_channels 4 z_dim), num_layers blocks, a
    rotary split of the head dim over (frame, h, w); a tiny Qwen2.5-VL text encoder with a byte-level Qwen2
    tokenizer over the template and `words`; Qwen-Image's scheduler config. The built latent side is recorded in the
    transformer config (`_sample_size`) as the native size."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2Tokenizer

    torch.manual_seed(seed)
    tok_dir = os.path.join(folder, "_tok")
    write_qwen2_tokenizer(tok_dir, words)
    tokenizer = Qwen2Tokenizer.from_pretrained(tok_dir)  # as saved: what from_pretrained(folder) will load
    text_encoder = _tiny_text_encoder(tokenizer, spec)

    ch = list(spec.vae_block_channels)
    if any(c % ch[0] for c in ch):
        raise ValueError(f"model.tiny.vae_block_channels={ch}: Qwen-Image's VAE needs multiples of the first")
    c = spec.latent_channels
    vae = AutoencoderKLQwenImage(base_dim=ch[0], z_dim=c, dim_mult=[x // ch[0] for x in ch], num_res_blocks=1,
                                 attn_scales=[], temperal_downsample=[False] * (len(ch) - 1), dropout=0.0,
                                 latents_mean=[round(0.1 * (i - c / 2), 4) for i in range(c)],
                                 latents_std=[round(1.0 + 0.25 * i, 4) for i in range(c)])
    latent = spec.resolution // 2 ** (len(ch) - 1)
    hd = spec.attention_head_dim
    side = (hd * 7 // 16) // 2 * 2                     # rotary axes (frame, h, w): even, summing to the head dim
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * c, out_channels=c, num_layers=spec.num_layers, attention_head_dim=hd,
        num_attention_heads=spec.num_attention_heads, joint_attention_dim=spec.text_hidden, guidance_embeds=False,
        axes_dims_rope=(hd - 2 * side, side, side))
    transformer.register_to_config(**{SAMPLE_SIZE_KEY: latent})
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipe.save_pretrained(folder)
    shutil.rmtree(tok_dir, ignore_errors=True)
    return pipe


# ----------------------------------------------------------------------------------------- geometry and schedule

def vae_factor(vae_config) -> int:
    """Pixels per latent cell of AutoencoderKLQwenImage: 2 ** len(temperal_downsample) (8 for Qwen-Image)."""
    return 2 ** len(vae_config.get("temperal_downsample", (False, True, True)))


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """mu linear in the image sequence length (diffusers.pipelines.qwenimage.pipeline_qwenimage.calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def qwen_sigmas(steps: int, image_seq_len: int, scheduler_config=None, device="cpu") -> torch.Tensor:
    """QwenImagePipeline's schedule: sigma = linspace(1, 1/T, T); with use_dynamic_shifting, mu =
    calculate_shift(image_seq_len) from the scheduler config and the scheduler's time shift (exponential: e^mu /
    (e^mu + (1/sigma - 1)); linear: mu / (mu + (1/sigma - 1))), otherwise the fixed shift of the config; then the
    stretch to shift_terminal (1 - (1 - sigma) (1 - shift_terminal) / (1 - sigma_last)); a final 0. fp64 math, fp32
    result (T+1,)."""
    c = dict(SCHEDULER_CONFIG)
    c.update(dict(scheduler_config or {}))
    for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
        if c.get(k):
            raise ValueError(f"scheduler config {k}=true: not a Qwen-Image schedule (not supported)")
    sig = np.linspace(1.0, 1.0 / steps, steps, dtype=np.float64)
    if c.get("use_dynamic_shifting"):
        mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        if c.get("time_shift_type", "exponential") == "exponential":
            sig = math.exp(mu) / (math.exp(mu) + (1.0 / sig - 1.0))
        else:
            sig = mu / (mu + (1.0 / sig - 1.0))
    else:
        s = float(c.get("shift", 1.0))
        sig = s * sig / (1.0 + (s - 1.0) * sig)
    if c.get("shift_terminal"):
        one_minus = 1.0 - sig
        sig = 1.0 - one_minus / (one_minus[-1] / (1.0 - c["shift_terminal"]))
    return torch.tensor(np.concatenate([sig, [0.0]]), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------- the family

@register_family
class QwenImageFamily:
    """Qwen-Image: true CFG v = n + w (c - n) rescaled per token to the conditional's norm, ||c|| / ||v|| over the
    packed channels (w <= 1: cond only); timestep = sigma; z = (latent - mean) / std per channel; 2x2 packing and the
    VAE's frame axis inside the calls."""
    name = "qwen_image"
    pipeline_class = "QwenImagePipeline"
    required = ("model_index.json", "transformer", "vae", "scheduler", "text_encoder", "tokenizer")
    lora_targets = LORA_TARGETS

    def from_pretrained(self, path: str, dtype: torch.dtype = torch.float32):
        return load_local_pipeline(self.pipeline_class, path, dtype)

    def build_tiny(self, folder: str, words: list, spec, seed: int = 0):
        return build_tiny_qwen_image(folder, words, spec, seed=seed)

    def bind(self, pipe) -> None:
        if pipe.transformer.config.get("guidance_embeds"):
            raise ValueError("QwenImageTransformer2DModel with guidance_embeds=true (a guidance-distilled variant): "
                             "not supported (this family runs true CFG)")

    def text_encoders(self, pipe) -> list:
        return [m for m in (pipe.text_encoder,) if m is not None]

    def encode(self, pipe, prompts: list, max_sequence_length: int, device) -> Cond:
        """-> Cond(embeds (N, L, D), mask (N, L) int64), L = max_sequence_length: QwenImagePipeline.encode_prompt
        (template, prefix dropped, truncated to L), zero-padded to L with mask 0 on the padding."""
        pe, mask = pipe.encode_prompt(prompt=list(prompts), device=device, num_images_per_prompt=1,
                                      max_sequence_length=max_sequence_length)
        n, l, d = pe.shape
        if mask is None:  # encode_prompt drops an all-ones mask
            mask = torch.ones(n, l, dtype=torch.long, device=pe.device)
        pad = max_sequence_length - l
        if pad > 0:
            pe = torch.cat([pe, pe.new_zeros(n, pad, d)], dim=1)
            mask = torch.cat([mask, mask.new_zeros(n, pad)], dim=1)
        return Cond(embeds=pe, mask=mask.to(torch.long))

    def nfe_per_sample(self, guidance: float) -> int:
        return 2 if guidance > 1.0 else 1

    def velocity(self, transformer, z, sigma, cond: Cond, guidance: float, grad_uncond: bool = True):
        B, C, h, w = z.shape

        def forward(x, s, c):  # -> packed (rows, h/2 * w/2, 4C); the CFG combine is a per-token rule on these
            return transformer(hidden_states=pack(x), timestep=s, encoder_hidden_states=c.embeds,
                               encoder_hidden_states_mask=c.mask, img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0],
                               return_dict=False)[0]

        if guidance <= 1.0:
            return unpack(forward(z, sigma, cond.positive()), h, w)

        def combine(vu, vc):  # QwenImagePipeline's true CFG with the norm rescale
            comb = vu + guidance * (vc - vu)
            return comb * (torch.norm(vc, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

        return unpack(cfg_velocity(forward, z, sigma, cond, grad_uncond, combine), h, w)

    def decode(self, vae, latents):
        """(B, C, h, w) -> frame axis -> latents / (1 / std) + mean per channel -> vae.decode -> (B, 3, H, W) in
        [0, 1] (QwenImagePipeline's decode and VaeImageProcessor's denormalize)."""
        cfg = vae.config
        x = latents.to(vae.dtype).unsqueeze(2)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(x.device, x.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(x.device, x.dtype)
        img = vae.decode(x / inv_std + mean, return_dict=False)[0][:, :, 0]
        return (img.float() * 0.5 + 0.5).clamp(0.0, 1.0)

    def vae_factor(self, vae) -> int:
        return vae_factor(vae.config)

    def latent_shape(self, transformer, vae, resolution: Optional[int]) -> tuple:
        c = vae.config.z_dim
        if resolution is None:
            s = transformer.config.get(SAMPLE_SIZE_KEY) or DEFAULT_SAMPLE_SIZE
            return (c, s, s)
        # rotary positions (a 4096-entry table each side): no table to outgrow at any practical size
        return square_latent(c, resolution, vae_factor(vae.config), transformer.config.patch_size)

    def sigmas(self, steps: int, shift: float, latent_shape: tuple, scheduler_config=None, device="cpu"):
        """QwenImagePipeline's table for these latents (qwen_sigmas); `shift` (sampling.shift) is not used: the
        scheduler config's dynamic shift sets it from the image sequence length."""
        _, h, w = latent_shape
        return qwen_sigmas(steps, (h // 2) * (w // 2), scheduler_config, device=device)

    def plan_geometry(self, transformer_config: dict, vae_config: dict, resolution: Optional[int],
                      max_sequence_length: int, guidance: float) -> dict:
        f = vae_factor(vae_config or {})
        p = transformer_config.get("patch_size", 2)
        res = resolution or (transformer_config.get(SAMPLE_SIZE_KEY) or DEFAULT_SAMPLE_SIZE) * f
        side = res // f
        return {"resolution": res, "latent": side, "image_tokens": (side // p) ** 2,
                "text_tokens": max_sequence_length, "cfg_rows": self.nfe_per_sample(guidance)}
