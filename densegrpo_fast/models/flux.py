"""FLUX.1 (dev / schnell): MMDiT + single-stream blocks, 2x2-packed latents with position ids, guidance as an input
of the network (one forward per sample, no CFG batch), a schedule shift from the image sequence length.

A tiny FLUX built from configs (tests, CPU runs) loads through the same `FluxPipeline.from_pretrained(local folder)`
call as a real FLUX.1-dev checkpoint; nothing is fetched from a hub. Latents stay (B, C, h, w) outside this file: the
packing into (B, h/2 * w/2, 4C) tokens happens inside `velocity` (a permutation: the per-sample SDE ops are the same
on either layout).
"""
from __future__ import annotations

import math
import os
import shutil
from typing import Optional

import numpy as np
import torch

from .base import (Cond, load_local_pipeline, pack, register_family, scaled_vae_decode,
                   square_latent, unpack, vae_scale_factor)
from .sd3 import LORA_TARGETS
from .tokenizers import write_clip_tokenizer, write_t5_tokenizer


def build_tiny_flux(folder: str, words: list[str], spec, seed: int = 0):
    """Write a randomly initialised tiny FLUX.1-dev-architecture pipeline (diffusers format) to `folder`.

    spec: config.TinyModelConfig. VAE downsampling 2^(len(vae_block_channels)-1); the transformer takes 2x2-packed
    latents (in_channels = 4 x latent_channels), num_layers double-stream + num_layers single-stream blocks, a
    guidance embedding (dev); CLIP (pooled) + T5 (sequence) text encoders with tokenizers over `words`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(seed)
    tok_dir, t5_dir = os.path.join(folder, "_tok"), os.path.join(folder, "_t5tok")
    write_clip_tokenizer(tok_dir, words, spec.tokenizer_max_length)
    write_t5_tokenizer(t5_dir, words, 512)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokenizer_2 = T5Tokenizer.from_pretrained(t5_dir)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=spec.text_hidden, intermediate_size=2 * spec.text_hidden,
        num_hidden_layers=max(spec.text_layers, 1), num_attention_heads=2,
        max_position_embeddings=spec.tokenizer_max_length, projection_dim=spec.text_hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=spec.text_hidden, d_kv=spec.text_hidden // 2,
                                 d_ff=2 * spec.text_hidden, num_layers=max(spec.text_layers, 1), num_heads=2,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    n_down = len(spec.vae_block_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n_down,
                        up_block_types=["UpDecoderBlock2D"] * n_down, block_out_channels=list(spec.vae_block_channels),
                        latent_channels=spec.latent_channels, layers_per_block=1,
                        norm_num_groups=min(8, spec.vae_block_channels[0]), sample_size=spec.resolution,
                        scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False)
    hd = spec.attention_head_dim
    side = (hd * 3 // 8) // 2 * 2                     # rotary axes (text, h, w): even sizes summing to the head dim
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * spec.latent_channels, num_layers=spec.num_layers,
        num_single_layers=spec.num_layers, attention_head_dim=hd, num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.text_hidden, pooled_projection_dim=spec.text_hidden, guidance_embeds=True,
        axes_dims_rope=(hd - 2 * side, side, side))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(folder)
    shutil.rmtree(tok_dir, ignore_errors=True)
    shutil.rmtree(t5_dir, ignore_errors=True)
    return pipe


def flux_sigmas(steps: int, image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                base_shift: float = 0.5, max_shift: float = 1.15, device="cpu") -> torch.Tensor:
    """FLUX's schedule as FluxPipeline builds it: sigma = linspace(1, 1/T, T), mu interpolated linearly in the image
    sequence length between base_shift (base_seq_len tokens) and max_shift (max_seq_len), sigma' = e^mu /
    (e^mu + (1/sigma - 1)), then a final 0. fp64 math, fp32 result. (T+1,)"""
    sig = np.linspace(1.0, 1.0 / steps, steps, dtype=np.float64)
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = image_seq_len * m + (base_shift - m * base_seq_len)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / sig - 1.0))
    return torch.tensor(np.concatenate([shifted, [0.0]]), dtype=torch.float32, device=device)


@register_family
class FluxFamily:
    """FLUX.1: v = F(z, sigma, text, guidance = w) (dev's guidance embedding; schnell has none), timestep = sigma,
    z = (latent - shift_factor) * scaling_factor, 2x2 packing inside the call."""
    name = "flux"
    pipeline_class = "FluxPipeline"
    required = ("model_index.json", "transformer", "vae", "scheduler", "text_encoder", "tokenizer",
                "text_encoder_2", "tokenizer_2")
    lora_targets = LORA_TARGETS

    def __init__(self):
        self._ids: dict = {}
        self.guidance_embeds = True  # FLUX.1-dev: True; schnell: False (set from the loaded transformer by bind)

    def from_pretrained(self, path: str, dtype: torch.dtype = torch.float32):
        return load_local_pipeline(self.pipeline_class, path, dtype)

    def build_tiny(self, folder: str, words: list, spec, seed: int = 0):
        return build_tiny_flux(folder, words, spec, seed=seed)

    def bind(self, pipe) -> None:
        self.guidance_embeds = bool(pipe.transformer.config.guidance_embeds)

    def text_encoders(self, pipe) -> list:
        return [m for m in (pipe.text_encoder, pipe.text_encoder_2) if m]

    def encode(self, pipe, prompts: list, max_sequence_length: int, device) -> Cond:
        """-> Cond(embeds (N, L, D) from T5, pooled (N, P) from CLIP)."""
        pe, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                           max_sequence_length=max_sequence_length)
        return Cond(embeds=pe, pooled=pooled)

    def nfe_per_sample(self, guidance: float) -> int:
        return 1

    def _img_ids(self, h2: int, w2: int, device, dtype):
        key = (h2, w2, device, dtype)
        if key not in self._ids:
            ids = torch.zeros(h2, w2, 3)
            ids[..., 1] += torch.arange(h2)[:, None]
            ids[..., 2] += torch.arange(w2)[None, :]
            self._ids[key] = ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)
        return self._ids[key]

    def velocity(self, transformer, z, sigma, cond: Cond, guidance: float, grad_uncond: bool = True):
        B, C, h, w = z.shape
        embeds = cond.embeds
        g = torch.full((B,), float(guidance), device=z.device, dtype=torch.float32) if self.guidance_embeds else None
        out = transformer(hidden_states=pack(z), timestep=sigma, guidance=g, pooled_projections=cond.pooled,
                          encoder_hidden_states=embeds,
                          txt_ids=torch.zeros(embeds.shape[1], 3, device=z.device, dtype=embeds.dtype),
                          img_ids=self._img_ids(h // 2, w // 2, z.device, embeds.dtype), return_dict=False)[0]
        return unpack(out, h, w)

    def decode(self, vae, latents):
        return scaled_vae_decode(vae, latents)

    def vae_factor(self, vae) -> int:
        return vae_scale_factor(vae)

    def latent_shape(self, transformer, vae, resolution: Optional[int]) -> tuple:
        c = vae.config.latent_channels
        if resolution is None:
            s = vae.config.sample_size // vae_scale_factor(vae)
            return (c, s, s)
        return square_latent(c, resolution, vae_scale_factor(vae), 2)  # rotary ids: no table to outgrow

    def sigmas(self, steps: int, shift: float, latent_shape: tuple, scheduler_config=None, device="cpu"):
        c = dict(scheduler_config or {})
        _, h, w = latent_shape
        return flux_sigmas(steps, (h // 2) * (w // 2), c.get("base_image_seq_len", 256),
                           c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15),
                           device=device)

    def plan_geometry(self, transformer_config: dict, vae_config: dict, resolution: Optional[int],
                      max_sequence_length: int, guidance: float) -> dict:
        f = 2 ** (len(vae_config.get("block_out_channels", (1, 2, 3, 4))) - 1)
        res = resolution or vae_config.get("sample_size", 1024)
        side = res // f
        return {"resolution": res, "latent": side, "image_tokens": (side // 2) ** 2,
                "text_tokens": max_sequence_length, "cfg_rows": 1}
