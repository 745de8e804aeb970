"""Model families behind one seam: what differs between SD3 and FLUX.1, and nothing else.

A family says how the network is called (`call`), whether classifier-free guidance is a [uncond; cond] batch
(SD3) or an input of the network (FLUX-dev's guidance embedding), how prompts are encoded, the sigma schedule, the
latent geometry and which diffusers pipeline class loads and exports it. Samplers, completions, branching, training
and evaluation keep latents as (B, C, h, w) and call the network only through `GuidedVelocity(.., family)`; FLUX's
2x2 packing into (B, h/2 * w/2, 4C) tokens happens inside `FluxFamily.call` (a permutation: the per-sample SDE ops
are the same on either layout).

Add a family: subclass nothing — write a class with the attributes and methods below, register it in FAMILIES and
in PIPELINE_CLASSES (the `_class_name` of its model_index.json), and give `models/` a tiny builder for the tests.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np
import torch


class SD3Family:
    """Stable Diffusion 3 / 3.5: MMDiT, CFG as one [uncond; cond] batch, fixed schedule shift."""
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    cfg_batch = True          # CFG doubles the network batch: 2 network evaluations per sample
    required = ("model_index.json", "transformer", "vae", "scheduler", "text_encoder", "tokenizer")

    def call(self, transformer, z: torch.Tensor, t: torch.Tensor, embeds, pooled, guidance: float):
        """z (B,C,h,w), t (B,) in [0, 1000] -> the network's velocity (B,C,h,w)."""
        return transformer(hidden_states=z, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                           return_dict=False)[0]

    def encode(self, pipe, prompts: list[str], max_sequence_length: int, device):
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                              num_images_per_prompt=1, do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
        return pe, pooled

    def sigmas(self, steps: int, shift: float, latent_shape, scheduler_config=None, device="cpu") -> torch.Tensor:
        from ..rollout.schedule import flow_sigmas
        return flow_sigmas(steps, shift, device=device)

    def bind(self, transformer) -> None:
        """Read what the calls need from the loaded transformer (its config; the caller may later wrap it)."""

    def patch(self, transformer) -> int:
        return transformer.config.patch_size

    def default_latent(self, transformer, vae) -> int:
        return transformer.config.sample_size

    def max_patches(self, transformer) -> Optional[int]:
        return getattr(transformer.config, "pos_embed_max_size", None)

    def text_encoders(self, pipe) -> list:
        return [m for m in (pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None)) if m]


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


class FluxFamily:
    """FLUX.1 (dev): MMDiT + single-stream blocks, 2x2-packed latents with position ids, guidance as an input (one
    forward per sample, no CFG batch), schedule shift from the image sequence length."""
    name = "flux"
    pipeline_class = "FluxPipeline"
    cfg_batch = False
    required = ("model_index.json", "transformer", "vae", "scheduler", "text_encoder", "tokenizer",
                "text_encoder_2", "tokenizer_2")

    def __init__(self, guidance_embeds: bool = True):
        self._ids: dict = {}
        self.guidance_embeds = guidance_embeds  # FLUX.1-dev: True; schnell: False (set from the loaded transformer)

    def bind(self, transformer) -> None:
        self.guidance_embeds = bool(transformer.config.guidance_embeds)

    def _img_ids(self, h2: int, w2: int, device, dtype):
        key = (h2, w2, device, dtype)
        if key not in self._ids:
            ids = torch.zeros(h2, w2, 3)
            ids[..., 1] += torch.arange(h2)[:, None]
            ids[..., 2] += torch.arange(w2)[None, :]
            self._ids[key] = ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)
        return self._ids[key]

    @staticmethod
    def pack(z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens (FluxPipeline._pack_latents)."""
        B, C, h, w = z.shape
        return z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)

    @staticmethod
    def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of pack."""
        B, _, D = x.shape
        return x.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, h, w)

    def call(self, transformer, z: torch.Tensor, t: torch.Tensor, embeds, pooled, guidance: float):
        B, C, h, w = z.shape
        g = torch.full((B,), float(guidance), device=z.device, dtype=torch.float32) if self.guidance_embeds else None
        out = transformer(hidden_states=self.pack(z), timestep=t / 1000.0, guidance=g, pooled_projections=pooled,
                          encoder_hidden_states=embeds,
                          txt_ids=torch.zeros(embeds.shape[1], 3, device=z.device, dtype=embeds.dtype),
                          img_ids=self._img_ids(h // 2, w // 2, z.device, embeds.dtype), return_dict=False)[0]
        return self.unpack(out, h, w)

    def encode(self, pipe, prompts: list[str], max_sequence_length: int, device):
        pe, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                           max_sequence_length=max_sequence_length)
        return pe, pooled

    def sigmas(self, steps: int, shift: float, latent_shape, scheduler_config=None, device="cpu") -> torch.Tensor:
        c = dict(scheduler_config or {})
        _, h, w = latent_shape
        return flux_sigmas(steps, (h // 2) * (w // 2), c.get("base_image_seq_len", 256),
                           c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15),
                           device=device)

    def patch(self, transformer) -> int:
        return 2   # packing: the latent must split into 2x2 patches

    def default_latent(self, transformer, vae) -> int:
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        return vae.config.sample_size // f

    def max_patches(self, transformer) -> Optional[int]:
        return None  # rotary position ids: no table to outgrow

    def text_encoders(self, pipe) -> list:
        return [m for m in (pipe.text_encoder, pipe.text_encoder_2) if m]


FAMILIES = {"sd3": SD3Family, "flux": FluxFamily}
PIPELINE_CLASSES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def family_of_folder(path: str) -> str:
    """The family named by a diffusers folder's model_index.json; a clear error for any other pipeline class."""
    from .sd3 import ModelFolderError
    index_path = os.path.join(path, "model_index.json")
    try:
        with open(index_path) as f:
            cls = json.load(f).get("_class_name", "")
    except OSError as exc:
        raise ModelFolderError(f"model folder '{path}': cannot read model_index.json ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"model folder '{path}': model_index.json is not valid JSON ({exc})") from exc
    if cls not in PIPELINE_CLASSES:
        raise ModelFolderError(f"model folder '{path}': model_index.json names pipeline class {cls!r}; supported: "
                               f"{', '.join(sorted(PIPELINE_CLASSES))} (model.family)")
    return PIPELINE_CLASSES[cls]


def get_family(name: str):
    return FAMILIES[name]()
