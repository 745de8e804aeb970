"""Ground-truth renderer for the shapes benchmark: a prompt spec -> a 64x64 RGB image (numpy, deterministic per rng).

Shapes: circle (radius r), square (side 1.7 r), triangle (apex up, base 2 r, height 1.8 r), rectangle (2.4 r x 1.2 r,
horizontal), diamond (a square turned 45 degrees, diagonals 2 r).
Variation: object size (r 6-9 px at 64 px), placement, colour jitter (+-12 per channel), a dark near-grey
background with pixel noise. Objects never overlap (3 px gap), so the verifier's connected components are objects.
Relations are rendered with a clear margin: "left of" means dx >= 8 px and |dx| >= |dy| + 4.
"""
from __future__ import annotations

import numpy as np

from ..prompts.shapes import COLORS, SHAPES, ShapesPrompt

PALETTE = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (230, 210, 40),
           "purple": (150, 60, 200), "orange": (240, 130, 30), "cyan": (40, 200, 210)}
# half-diagonal of each shape's bounding box in units of r: placement keeps these discs apart
EXTENT = {"circle": 1.0, "square": 0.85 * 2 ** 0.5, "triangle": 1.0, "rectangle": (1.2 ** 2 + 0.6 ** 2) ** 0.5,
          "diamond": 1.0}


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        h = r * 0.85
        return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    if shape == "triangle":  # apex up, base at cy + 0.8 r, half-width r at the base
        top, bot = cy - r, cy + 0.8 * r
        t = (yy - top) / (bot - top)
        return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r)
    if shape == "rectangle":
        return (np.abs(xx - cx) <= 1.2 * r) & (np.abs(yy - cy) <= 0.6 * r)
    if shape == "diamond":
        return np.abs(xx - cx) + np.abs(yy - cy) <= r
    raise ValueError(f"unknown shape {shape!r}")


def _relation_ok(rel: str, a, b) -> bool:
    dx, dy = b[0] - a[0], b[1] - a[1]
    if rel == "left of":
        return dx >= 8 and abs(dx) >= abs(dy) + 4
    if rel == "right of":
        return -dx >= 8 and abs(dx) >= abs(dy) + 4
    if rel == "above":
        return dy >= 8 and abs(dy) >= abs(dx) + 4
    if rel == "below":
        return -dy >= 8 and abs(dy) >= abs(dx) + 4
    raise ValueError(rel)


def layout(prompt: ShapesPrompt, rng: np.random.Generator, size: int = 64) -> list[tuple]:
    """-> [(shape, colour, cx, cy, r)] satisfying the prompt, placed without overlap."""
    objs = prompt.objs()
    if prompt.category == "counting":
        items = [(objs[0].shape, None)] * prompt.count
    else:
        items = [(o.shape, o.color) for o in objs]
    for _ in range(1000):
        placed = []
        ok = True
        for shape, color in items:
            r = rng.uniform(6.0, 9.0) if len(items) < 4 else rng.uniform(5.5, 7.5)
            for _ in range(200):
                half_w = 1.2 * r if shape == "rectangle" else r
                cx = rng.uniform(half_w + 2, size - half_w - 2)
                cy = rng.uniform(r + 2, size - r - 2)
                e = EXTENT[shape] * r
                if all((cx - p[2]) ** 2 + (cy - p[3]) ** 2 >= (e + EXTENT[p[0]] * p[4] + 3) ** 2 for p in placed):
                    break
            else:
                ok = False
                break
            placed.append((shape, color or COLORS[rng.integers(len(COLORS))], cx, cy, r))
        if ok and prompt.relation is not None:
            ok = _relation_ok(prompt.relation, placed[0][2:4], placed[1][2:4])
        if ok:
            return placed
    raise RuntimeError(f"could not lay out {prompt.text!r}")


def render_with_layout(prompt: ShapesPrompt, rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, list]:
    """-> (size, size, 3) uint8 and the layout drawn [(shape, colour, cx, cy, r)]."""
    bg = rng.uniform(10, 60) + rng.uniform(-6, 6, size=3)
    img = np.clip(bg[None, None, :] + rng.normal(0, 3, size=(size, size, 3)), 0, 255)
    placed = layout(prompt, rng, size)
    for shape, color, cx, cy, r in placed:
        col = np.clip(np.array(PALETTE[color]) + rng.uniform(-12, 12, size=3), 0, 255)
        img[shape_mask(shape, cx, cy, r, size)] = col
    return img.astype(np.uint8), placed


def render(prompt: ShapesPrompt, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """-> (size, size, 3) uint8."""
    return render_with_layout(prompt, rng, size)[0]


def render_batch(prompts: list[ShapesPrompt], seed: int, size: int = 64) -> np.ndarray:
    """-> (B, size, size, 3) uint8; image i uses rng(seed, i)."""
    return np.stack([render(p, np.random.default_rng([seed, i]), size) for i, p in enumerate(prompts)])


def random_prompt_like(prompt: ShapesPrompt, rng: np.random.Generator, pool: list[ShapesPrompt]) -> ShapesPrompt:
    """A prompt of the same category that asks for a different scene (not another phrasing of this one)."""
    scene = lambda p: ([(o.shape, o.color) for o in p.objs()], p.count, p.relation)  # noqa: E731
    others = [p for p in pool if p.category == prompt.category and scene(p) != scene(prompt)]
    return others[rng.integers(len(others))]


__all__ = ["PALETTE", "SHAPES", "render", "render_with_layout", "render_batch", "layout", "shape_mask"]
