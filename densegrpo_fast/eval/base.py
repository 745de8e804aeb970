"""The evaluation before training (epoch -1), reused across runs with identical inputs (eval.base_cache): keyed by a
digest of the model folder, the package source, the settings and the device type."""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # densegrpo_fast/


def _tree_digest(h, root: str, suffixes: Optional[tuple] = None) -> None:
    """Feed every file under root (relative path + bytes; `suffixes` filters by name) into the hash h, in order."""
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if suffixes and not name.endswith(suffixes):
                continue
            path = os.path.join(d, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())


def base_eval_key(cfg, device) -> str:
    """A digest of everything the evaluation before training depends on: the model folder's files, the package's
    source, the model/eval/reward/prompt settings, the evaluation schedule and the device type (LoRA starts at zero,
    so the training seed, the method and the LoRA rank do not enter)."""
    import dataclasses
    import hashlib
    h = hashlib.sha256()
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "lora"}
    parts = {"model": model, "eval": dataclasses.asdict(cfg.eval) | {"base_cache": None},
             "reward": dataclasses.asdict(cfg.reward), "prompts": dataclasses.asdict(cfg.prompts),
             "sampling": {k: getattr(cfg.sampling, k) for k in ("eval_steps", "shift", "sample_batch")},
             "device": torch.device(device).type}
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    if os.path.isdir(cfg.model.path or ""):
        _tree_digest(h, cfg.model.path)
    _tree_digest(h, PACKAGE_DIR, (".py",))
    return h.hexdigest()[:24]


def base_evaluation(ctx, evaluate: Callable[[], dict]) -> dict:
    """The evaluation before training (epoch -1): `evaluate()` (the caller's, with the weights it evaluates swapped
    in) -> the row. With eval.base_cache set (compare sets it), a run whose base_eval_key matches a stored one reuses
    its figures and per-image record instead of generating the same images again; a miss evaluates and stores them
    (atomically). The hit/miss decision is agreed across ranks. ctx: an eval.context.EvalContext."""
    from ..train.distributed import agree_any
    from ..utils.io import atomic_write_json
    folder = ctx.cfg.eval.base_cache
    if not folder:
        return evaluate()
    folder = os.path.join(folder, base_eval_key(ctx.cfg, ctx.device))
    row_path, rec_path = os.path.join(folder, "row.json"), os.path.join(folder, "epoch-1.json")
    if not agree_any(not (os.path.isfile(row_path) and os.path.isfile(rec_path)), ctx.device):
        with open(row_path) as f:
            row = json.load(f)
        if ctx.main:
            with open(rec_path) as f:
                atomic_write_json(os.path.join(ctx.run_dir, "evals", "epoch-1.json"), json.load(f))
            print(f"evaluation before training: reused from {folder}", flush=True)
        return row
    row = evaluate()
    if ctx.main:
        with open(os.path.join(ctx.run_dir, "evals", "epoch-1.json")) as f:
            atomic_write_json(rec_path, json.load(f))
        atomic_write_json(row_path, row)  # written last: its presence marks a complete entry
    return row
