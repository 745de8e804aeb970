"""OCR reward with a real text recogniser: PP-OCR detection + recognition models shipped inside the
`rapidocr-onnxruntime` wheel (ONNX Runtime on the CPU; nothing is downloaded).

The target is the text between double quotes in the prompt (prompts/ocr_target). Score, on lower-cased strings
with spaces removed: 1 if the recognised text contains the target, else 1 - min(edit distance, len(target)) /
len(target); an image with no text scores 0. A prompt without a quoted target is an error (the reward's
`check_prompts`, which CombinedReward.check_prompts runs on every prompt at start-up), never a silent 0.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from .registry import register


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), O(len(a) len(b))."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _norm(s: str) -> str:
    return "".join(s.lower().split())


def ocr_score(recognised: str, target: str) -> float:
    """1 - min(d, n)/n on normalised strings (n = target length); containment scores 1."""
    r, t = _norm(recognised), _norm(target)
    if not t:
        raise ValueError("empty OCR target")
    if t in r:
        return 1.0
    return 1.0 - min(edit_distance(r, t), len(t)) / len(t)


class OcrEngine:
    """RapidOCR (PP-OCR det + rec, ONNX Runtime), one per process, serialised across reward threads."""
    _instance = None
    _lock = threading.Lock()

    def __init__(self):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise ImportError("the ocr reward needs rapidocr-onnxruntime (`pip install -e .[ocr]`; make install "
                              "installs it)") from exc
        self.engine = RapidOCR()

    @classmethod
    def get(cls) -> "OcrEngine":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def read(self, image: np.ndarray) -> str:
        """(H, W, 3) uint8 -> the recognised text, lines joined by spaces ('' when none)."""
        with self._lock:
            res, _ = self.engine(image)
        return " ".join(r[1] for r in (res or []))


@register("ocr")
def ocr(_cfg=None, device=None, batch_size=None):
    from ..prompts import ocr_target
    from .jpeg import to_uint8
    engine = OcrEngine.get()

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        targets = [ocr_target(p) for p in prompts]
        return torch.tensor([ocr_score(engine.read(im), t) for im, t in zip(to_uint8(images), targets)],
                            dtype=torch.float32)
    reward.check_prompts = check_prompts
    return reward


def check_prompts(prompts: list[str], where: str) -> None:
    """Prompt-load-time check of the ocr reward: every prompt needs a quoted target."""
    from ..prompts import ocr_target
    for i, p in enumerate(prompts):
        try:
            ocr_target(p)
        except ValueError:
            raise ValueError(f"{where}: prompt {i} ({p!r}) has no text between double quotes, which the ocr reward "
                             "needs as its target") from None
