"""Uncertainty for comparisons: bootstrap CIs over prompts, paired differences, t-intervals over seeds, verdicts.

Evaluation scores are per (prompt, sample); every run evaluates the same (prompt, sample) pairs with the same noise
(eval.seed), so two runs' scores are paired by prompt. Resampling is over prompts (the unit the benchmark draws),
keeping a prompt's samples together.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

# two-sided 97.5 % quantiles of Student's t for 1..30 degrees of freedom (then the normal 1.96)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(dof: int) -> float:
    return _T975[dof - 1] if 1 <= dof <= len(_T975) else 1.96


def category_mean(scores: np.ndarray, categories: Optional[np.ndarray]) -> float:
    """Mean over categories of the per-category mean (GenEval's overall), or the plain mean without categories."""
    if categories is None:
        return float(np.mean(scores))
    return float(np.mean([scores[categories == c].mean() for c in np.unique(categories)]))


def bootstrap_ci(scores: np.ndarray, prompt_ids: np.ndarray, categories: Optional[np.ndarray] = None,
                 n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Score (category mean of per-image scores) and its percentile bootstrap CI, resampling prompts with
    replacement within each category. scores, prompt_ids, categories: (n_images,). -> (score, lo, hi)."""
    scores, prompt_ids = np.asarray(scores, float), np.asarray(prompt_ids)
    cats = np.asarray(categories) if categories is not None else None
    est = category_mean(scores, cats)
    rng = np.random.default_rng(seed)
    groups = {}
    for c in (np.unique(cats) if cats is not None else [None]):
        sel = np.ones_like(prompt_ids, bool) if c is None else cats == c
        pids = np.unique(prompt_ids[sel])
        groups[c] = [scores[sel & (prompt_ids == p)] for p in pids]
    boots = np.empty(n_boot)
    for b in range(n_boot):
        means = []
        for c, per_prompt in groups.items():
            pick = rng.integers(0, len(per_prompt), len(per_prompt))
            means.append(np.concatenate([per_prompt[i] for i in pick]).mean())
        boots[b] = np.mean(means)
    a = (1 - level) / 2
    return est, float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))


def paired_bootstrap_diff(a: np.ndarray, b: np.ndarray, prompt_ids: np.ndarray,
                          categories: Optional[np.ndarray] = None, n_boot: int = 2000,
                          seed: int = 0) -> tuple[float, float, float]:
    """score(a) - score(b) on the same (prompt, sample) images, with a bootstrap CI resampling prompts (pairs kept
    together). -> (difference, lo, hi)."""
    return bootstrap_ci(np.asarray(a, float) - np.asarray(b, float), prompt_ids, categories, n_boot, seed)


def seed_summary(values) -> dict:
    """Mean, sample std (ddof = 1) and the 95 % t-interval of per-seed values."""
    x = np.asarray(values, float)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    sd = float(x.std(ddof=1)) if n > 1 else float("nan")
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": sd, "ci": (mean - half, mean + half)}


def verdict(lo: float, hi: float) -> str:
    """From a CI of (method - baseline): resolved better / resolved worse / not resolved."""
    if lo > 0:
        return "resolved better"
    if hi < 0:
        return "resolved worse"
    return "not resolved"
