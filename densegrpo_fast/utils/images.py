"""PNG outputs: sample grids with captions."""
from __future__ import annotations

import os

import torch
from PIL import Image, ImageDraw


def save_grid(images: torch.Tensor, captions: list[str], path: str, cols: int = 4, scale: int = 2) -> None:
    """images (B,3,H,W) in [0,1] -> one PNG, each tile upscaled `scale`x with its caption underneath."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    B, _, H, W = images.shape
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    th, tw, cap = H * scale, W * scale, 24
    rows = -(-B // cols)
    grid = Image.new("RGB", (cols * max(tw, 128), rows * (th + cap)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(B):
        r, c = divmod(i, cols)
        x, y = c * max(tw, 128), r * (th + cap)
        grid.paste(Image.fromarray(arr[i]).resize((tw, th), Image.NEAREST), (x, y))
        text = captions[i] if i < len(captions) else ""
        draw.text((x + 2, y + th + 2), text[:22], fill=(0, 0, 0))
        if len(text) > 22:
            draw.text((x + 2, y + th + 12), text[22:44], fill=(0, 0, 0))
    grid.save(path)
