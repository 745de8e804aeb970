"""Prompt sources: an inline list, a text file (one prompt a line), or the shapes benchmark's splits."""
from __future__ import annotations

import os
import re


def load_prompts(cfg, split: str | None = None) -> list[str]:
    """cfg: config.PromptsConfig -> list of prompts for `split` (default cfg.split)."""
    split = split or cfg.split
    if cfg.source == "list":
        prompts = list(cfg.items)
    elif cfg.source == "file":
        if not os.path.isfile(cfg.path):
            raise FileNotFoundError(f"prompts.path: prompt file '{cfg.path}' not found")
        with open(cfg.path) as f:
            prompts = [line.strip() for line in f if line.strip()]
    else:
        from .shapes import load_split
        prompts = [p.text for p in load_split(split, cfg.path)]
    if not prompts:
        raise ValueError(f"prompts: source '{cfg.source}' gave no prompts")
    return prompts


def vocabulary(prompts: list[str]) -> list[str]:
    return sorted({w for p in prompts for w in re.findall(r"[a-z0-9]+", p.lower())})
