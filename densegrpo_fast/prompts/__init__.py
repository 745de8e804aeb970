"""Prompt sources: an inline list, a prompt file, or the shapes benchmark's splits.

Prompt files come in the formats users already have (`prompts.format`, auto by extension):
  text     one prompt a line (e.g. Flow-GRPO's dataset/pickscore/*.txt)
  ocr      one prompt a line, the text to render between double quotes (dataset/ocr/*.txt); a line without a quoted
           target is an error at load time naming the file and line, never a silent zero reward later
  geneval  JSON lines with `prompt`, `tag` and `include` / `exclude` lists of {class, count, color?, position?}
           (dataset/geneval/*_metadata.jsonl); `load_records` keeps the metadata for a verifier
"""
from __future__ import annotations

import json
import os
import re

_QUOTED = re.compile(r'"([^"]+)"')


def ocr_target(prompt: str) -> str:
    """The text between the first pair of double quotes; ValueError when there is none."""
    m = _QUOTED.search(prompt)
    if m is None:
        raise ValueError(f"no text between double quotes in prompt {prompt!r}")
    return m.group(1)


def file_format(cfg) -> str:
    if cfg.format != "auto":
        return cfg.format
    return "geneval" if cfg.path.endswith((".jsonl", ".json")) else "text"


def load_records(cfg) -> list[dict]:
    """The prompt file as records: {"prompt": str, ...metadata}. Errors name prompts.path and the line."""
    path = cfg.path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts.path: prompt file '{path}' not found")
    fmt = file_format(cfg)
    out = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            if fmt == "geneval":
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"prompts.path: '{path}' line {n} is not JSON ({exc}); prompts.format=geneval "
                                     f"expects one JSON object a line") from exc
                if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                    raise ValueError(f"prompts.path: '{path}' line {n} has no \"prompt\" string "
                                     f"(prompts.format=geneval)")
                out.append(rec)
            else:
                rec = {"prompt": line}
                if fmt == "ocr":
                    try:
                        rec["target"] = ocr_target(line)
                    except ValueError:
                        raise ValueError(f"prompts.path: '{path}' line {n} has no text between double quotes "
                                         f"(prompts.format=ocr needs the text to render quoted)") from None
                out.append(rec)
    return out


def load_prompts(cfg, split: str | None = None) -> list[str]:
    """cfg: config.PromptsConfig -> list of prompts for `split` (default cfg.split)."""
    split = split or cfg.split
    if cfg.source == "list":
        prompts = list(cfg.items)
    elif cfg.source == "file":
        prompts = [r["prompt"] for r in load_records(cfg)]
    else:
        from .shapes import load_split
        prompts = [p.text for p in load_split(split, cfg.path)]
    if not prompts:
        raise ValueError(f"prompts: source '{cfg.source}' gave no prompts")
    return prompts


def vocabulary(prompts: list[str]) -> list[str]:
    return sorted({w for p in prompts for w in re.findall(r"[a-z0-9]+", p.lower())})
