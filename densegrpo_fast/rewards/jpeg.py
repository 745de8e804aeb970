"""JPEG compressibility (DDPO / Flow-GRPO): R = -size(JPEG(image, quality 95)) in kB. Needs no weights."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .registry import register


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) float [0,1] -> (B,H,W,3) uint8."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def jpeg_size_kb(img: np.ndarray, quality: int = 95) -> float:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


@register("jpeg_compressibility")
def jpeg_compressibility(_cfg=None):
    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([-jpeg_size_kb(im) for im in to_uint8(images)], dtype=torch.float32)
    return reward


@register("jpeg_incompressibility")
def jpeg_incompressibility(_cfg=None):
    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([jpeg_size_kb(im) for im in to_uint8(images)], dtype=torch.float32)
    return reward
