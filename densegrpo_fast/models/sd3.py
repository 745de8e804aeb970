"""Stable Diffusion 3 / 3.5 (MMDiT): CFG as one [uncond; cond] batch, a fixed schedule shift, one SD3 VAE.

`SD3Family.from_pretrained` loads SD3.5-Medium/Large, the project's shipped default (assets/shapes_sd3_tiny) and a
tiny folder written by `build_tiny_sd3` through the same call; nothing is ever fetched from a hub.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .base import (Cond, cfg_velocity, load_local_pipeline, register_family, scaled_vae_decode,
                   square_latent, vae_scale_factor)
from .tokenizers import write_clip_tokenizer

LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


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


@register_family
class SD3Family:
    """SD3 / SD3.5: v = v_u + w (v_c - v_u) from one [uncond; cond] batch (w <= 1: cond only), timestep = 1000 sigma,
    z = (latent - shift_factor) * scaling_factor."""
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    required = ("model_index.json", "transformer", "vae", "scheduler", "text_encoder", "tokenizer")
    lora_targets = LORA_TARGETS

    def from_pretrained(self, path: str, dtype: torch.dtype = torch.float32):
        """load_local_pipeline; a folder without T5 (the tiny and shipped models) loads with text_encoder_3 = None:
        SD3 then pads the text sequence with zeros."""
        try:
            with open(os.path.join(path, "model_index.json")) as f:
                index = json.load(f)
        except (OSError, ValueError):
            index = {}  # load_local_pipeline names the unreadable file
        absent = {k: None for k in ("text_encoder_3", "tokenizer_3") if index.get(k) in (None, [None, None])}
        return load_local_pipeline(self.pipeline_class, path, dtype, **absent)

    def build_tiny(self, folder: str, words: list, spec, seed: int = 0):
        return build_tiny_sd3(folder, words, spec, seed=seed)

    def bind(self, pipe) -> None:
        pass

    def text_encoders(self, pipe) -> list:
        return [m for m in (pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None)) if m]

    def encode(self, pipe, prompts: list, max_sequence_length: int, device) -> Cond:
        """-> Cond(embeds (N, 77 + L, D), pooled (N, P))."""
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                              num_images_per_prompt=1, do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
        return Cond(embeds=pe, pooled=pooled)

    def nfe_per_sample(self, guidance: float) -> int:
        return 2 if guidance > 1.0 else 1

    def velocity(self, transformer, z, sigma, cond: Cond, guidance: float, grad_uncond: bool = True):
        def forward(x, s, c):
            return transformer(hidden_states=x, timestep=s * 1000.0, encoder_hidden_states=c.embeds,
                               pooled_projections=c.pooled, return_dict=False)[0]
        if guidance <= 1.0:
            return forward(z, sigma, cond.positive())
        return cfg_velocity(forward, z, sigma, cond, grad_uncond, lambda vu, vc: vu + guidance * (vc - vu))

    def decode(self, vae, latents):
        return scaled_vae_decode(vae, latents)

    def vae_factor(self, vae) -> int:
        return vae_scale_factor(vae)

    def latent_shape(self, transformer, vae, resolution: Optional[int]) -> tuple:
        c = vae.config.latent_channels
        if resolution is None:
            s = transformer.config.sample_size
            return (c, s, s)
        return square_latent(c, resolution, vae_scale_factor(vae), transformer.config.patch_size,
                             getattr(transformer.config, "pos_embed_max_size", None))

    def sigmas(self, steps: int, shift: float, latent_shape: tuple, scheduler_config=None, device="cpu"):
        """sigma_k = shift s / (1 + (shift - 1) s), s = 1 - k / T (FlowMatchEulerDiscreteScheduler, fixed shift)."""
        from ..rollout.schedule import flow_sigmas
        return flow_sigmas(steps, shift, device=device)

    def plan_geometry(self, transformer_config: dict, vae_config: dict, resolution: Optional[int],
                      max_sequence_length: int, guidance: float) -> dict:
        f = 2 ** (len(vae_config.get("block_out_channels", (1, 2, 3, 4))) - 1)
        p = transformer_config.get("patch_size", 2)
        res = resolution or transformer_config["sample_size"] * f
        side = res // f
        # CLIP-L + CLIP-G give 77 tokens, then T5's max_sequence_length
        return {"resolution": res, "latent": side, "image_tokens": (side // p) ** 2,
                "text_tokens": 77 + max_sequence_length, "cfg_rows": self.nfe_per_sample(guidance)}
