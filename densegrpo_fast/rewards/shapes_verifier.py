"""The shapes verifier: detect objects by colour segmentation + shape classification, then check the prompt.

Detection (numpy + scipy.ndimage, batched): a pixel is foreground when its saturation (max - min channel) is >= 60;
it takes the nearest palette colour; each colour's 8-connected components of >= 12 px are objects. Shape from the
component's mask inside its bounding box (h x w, box units x, y in [-1, 1]), in this order:
  drop = (centroid y - box centre y) / h >= 0.075        triangle (apex up: 0.12-0.17 drawn; others |drop| <= 0.05)
  fill of the corners |x| + |y| >= 1.5 >= 0.35           square, or rectangle when w / h >= 1.5 (drawn 1.0,
                                                         circles <= 0.13, diamonds 0)
  fill of |x| + |y| >= 1.1 >= 0.28                       circle (~0.5), else diamond (~0)
The thresholds sit between the drawn shapes and between the shipped VAE's reconstructions of them (where corners
round off): see tests/test_shapes.py.
Scores per prompt (GenEval's rules in miniature): `strict` (bool, for evaluation) and `partial` in [0, 1] (the
training reward, like GenEval's partial score): the fraction of the prompt's sub-conditions that hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from ..prompts.shapes import COLORS, ShapesPrompt, by_text
from .registry import register

_PAL = None
MIN_AREA = 12
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class Detection:
    shape: str
    color: str
    cx: float
    cy: float
    area: int


def _palette() -> np.ndarray:
    global _PAL
    if _PAL is None:
        from ..pretrain.render import PALETTE
        _PAL = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)
    return _PAL


def shape_features(mask: np.ndarray) -> tuple[float, float, float, float]:
    """mask (h, w) bool, cropped to the object's bounding box -> (drop, corner fill, outer fill, aspect w / h)."""
    h, w = mask.shape
    y = (np.arange(h)[:, None] + 0.5 - h / 2) / (h / 2)
    x = (np.arange(w)[None, :] + 0.5 - w / 2) / (w / 2)
    l1 = np.abs(x) + np.abs(y)
    rows = np.nonzero(mask)[0]

    def frac(region):  # a box one or two pixels thin has no such pixels: its overall fill stands in
        return float(mask[region].mean()) if region.any() else float(mask.mean())
    return float((rows.mean() + 0.5 - h / 2) / h), frac(l1 >= 1.5), frac(l1 >= 1.1), w / h


def classify_shape(mask: np.ndarray) -> str:
    drop, corner, outer, aspect = shape_features(mask)
    if drop >= 0.075:
        return "triangle"
    if corner >= 0.35:
        return "rectangle" if aspect >= 1.5 else "square"
    return "circle" if outer >= 0.28 else "diamond"


def detect(images: np.ndarray) -> list[list[Detection]]:
    """images (B,H,W,3) uint8 -> per image, the detected objects."""
    x = images.astype(np.int16)
    fg = (x.max(-1) - x.min(-1)) >= 60
    color_idx = np.full(fg.shape, -1, dtype=np.int8)
    px = x[fg].astype(np.float32)                                          # only foreground pixels
    color_idx[fg] = ((px[:, None, :] - _palette()[None]) ** 2).sum(-1).argmin(-1)
    H, W = fg.shape[1:]
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    for b in range(images.shape[0]):
        dets = []
        for ci in np.unique(color_idx[b]):
            if ci < 0:
                continue
            lab, n = ndimage.label(color_idx[b] == ci, structure=_EIGHT)
            idx = np.arange(1, n + 1)
            areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]
            keep = areas >= MIN_AREA
            if not keep.any():
                continue
            cy = ndimage.mean(yy, lab, idx)
            cx = ndimage.mean(xx, lab, idx)
            for sl, area, i, y, x_ in zip(ndimage.find_objects(lab), areas, idx, cy, cx):
                if area < MIN_AREA:
                    continue
                dets.append(Detection(classify_shape(lab[sl] == i), COLORS[ci], x_ + 0.5, y + 0.5, int(area)))
        out.append(dets)
    return out


def _rel(rel: str, a: Detection, b: Detection, m: float = 3.0) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if rel == "left of":
        return dx > m and abs(dx) > abs(dy)
    if rel == "right of":
        return -dx > m and abs(dx) > abs(dy)
    if rel == "above":
        return dy > m and abs(dy) > abs(dx)
    if rel == "below":
        return -dy > m and abs(dy) > abs(dx)
    raise ValueError(rel)


def score(prompt: ShapesPrompt, dets: list[Detection]) -> tuple[float, bool]:
    """-> (partial in [0, 1], strict)."""
    objs = prompt.objs()
    has = lambda s, c=None: any(d.shape == s and (c is None or d.color == c) for d in dets)  # noqa: E731
    cat = prompt.category
    if cat == "single_object":
        ok = has(objs[0].shape)
        return float(ok), ok
    if cat == "two_object":
        p = [has(o.shape) for o in objs]
        return sum(p) / 2, all(p)
    if cat == "counting":
        n = sum(d.shape == objs[0].shape for d in dets)
        return max(0.0, 1 - abs(n - prompt.count) / prompt.count), n == prompt.count
    if cat == "colors":
        ok = has(objs[0].shape, objs[0].color)
        return 0.5 * has(objs[0].shape) + 0.5 * ok, ok
    if cat == "position":
        a = [d for d in dets if d.shape == objs[0].shape]
        b = [d for d in dets if d.shape == objs[1].shape]
        ok = any(_rel(prompt.relation, x, y) for x in a for y in b)
        return 0.25 * bool(a) + 0.25 * bool(b) + 0.5 * ok, ok
    if cat == "color_attr":
        q = [has(o.shape, o.color) for o in objs]
        return 0.25 * (has(objs[0].shape) + has(objs[1].shape) + q[0] + q[1]), all(q)
    raise ValueError(f"unknown category {cat!r}")


class ShapesVerifier:
    def __init__(self, specs: Optional[dict] = None):
        self.specs = specs if specs is not None else by_text()

    def spec(self, text: str) -> ShapesPrompt:
        try:
            return self.specs[text]
        except KeyError:
            raise KeyError(f"shapes verifier: prompt {text!r} is not in the shapes benchmark") from None

    def __call__(self, images, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """images (B,3,H,W) float [0,1] tensor or (B,H,W,3) uint8 array -> partial (B,), strict (B,) bool."""
        if isinstance(images, torch.Tensor):
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        res = [score(self.spec(p), d) for p, d in zip(prompts, detect(images))]
        return np.array([r[0] for r in res], dtype=np.float32), np.array([r[1] for r in res], dtype=bool)


@register("shapes_partial")
def shapes_partial(_cfg=None):
    v = ShapesVerifier()
    return lambda images, prompts: torch.from_numpy(v(images, prompts)[0])


@register("shapes_strict")
def shapes_strict(_cfg=None):
    v = ShapesVerifier()
    return lambda images, prompts: torch.from_numpy(v(images, prompts)[1].astype(np.float32))
