"""Evaluation figures: the shapes verifier's strict accuracy per category (overall = mean over categories, as
GenEval reports), the paired difference to the evaluation before training with its bootstrap CI, verdict grids."""
from __future__ import annotations

import json
import os

import numpy as np
import torch


def shapes_report(strict: np.ndarray, partial: np.ndarray, categories: list[str]) -> dict:
    from ..prompts.shapes import CATEGORIES
    cats = np.array(categories)
    per = {c: float(strict[cats == c].mean()) for c in CATEGORIES if (cats == c).any()}
    return {"strict_accuracy": float(np.mean(list(per.values()))), "strict_accuracy_samples": float(strict.mean()),
            "partial_score": float(partial.mean()), "per_category": per, "n_images": int(strict.size)}


def diff_to_base(run_dir: str, epoch: int, prompts: list[str], pairs: list, strict: np.ndarray,
                 cats: list[str]) -> dict:
    """The paired difference of this evaluation's strict accuracy to the run's evaluation before training
    (evals/epoch-1.json: the same prompts and (prompt, sample) noise), with its bootstrap 95 % CI over prompts.
    {} when there is no base record or it scored other images."""
    path = os.path.join(run_dir, "evals", "epoch-1.json")
    if epoch < 0 or not os.path.isfile(path):
        return {}
    with open(path) as f:
        base = json.load(f)
    if base.get("prompts") != prompts or [tuple(p) for p in base.get("pairs", [])] != [tuple(p) for p in pairs]:
        return {}
    from ..stats import paired_bootstrap_diff
    d, lo, hi = paired_bootstrap_diff(strict.astype(float), np.array(base["strict"], float),
                                      np.array([i for i, _ in pairs]), np.array(cats), n_boot=1000, seed=epoch + 1)
    return {"eval_diff_base": d, "eval_diff_base_ci_lo": lo, "eval_diff_base_ci_hi": hi}


def save_verdict_grid(images: torch.Tensor, prompts: list[str], strict, path: str, limit: int = 32) -> None:
    from ..utils.images import save_grid
    caps = [f"{'OK' if s else 'X'} {p}" for p, s in zip(prompts, strict)]
    save_grid(images[:limit], caps[:limit], path, cols=8)
