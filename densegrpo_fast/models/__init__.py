"""Model families behind one seam (base.py: the `Family` protocol, `Cond`, `Models`, the registry).

sd3.py, flux.py and qwen_image.py each register one family; `build_models` turns a `model:` config section into the
`Models` the trainer uses: a local diffusers folder (model.path) or a tiny random model built from model.tiny.
"""
from __future__ import annotations

import os
from typing import Optional

from .base import DTYPES, Models, ModelFolderError, models_from_pipe
from .registry import check_model_folder, family_of_folder, get_family


def resolve_family(model_cfg) -> str:
    """model.family, with auto = the folder's model_index.json (a tiny build is SD3 unless model.family says)."""
    if model_cfg.family != "auto":
        get_family(model_cfg.family)  # a clear error for an unregistered name
        return model_cfg.family
    if model_cfg.path is not None:
        if not os.path.isdir(model_cfg.path):
            raise ModelFolderError(f"model folder '{model_cfg.path}' does not exist (model.path)")
        return family_of_folder(model_cfg.path)
    return "sd3"


def load_pipeline(path: str, family: str, dtype):
    """The family's pipeline from a local diffusers folder, after checking that the folder holds that family."""
    check_model_folder(path, family)
    return get_family(family).from_pretrained(path, dtype)


def build_models(model_cfg, device, words: Optional[list] = None, work_dir: Optional[str] = None,
                 seed: int = 0) -> Models:
    dtype = DTYPES[model_cfg.dtype]
    name = resolve_family(model_cfg)
    family = get_family(name)
    folder = model_cfg.path
    if folder is None:
        folder = os.path.join(work_dir or ".", "tiny_model")
        if not os.path.exists(os.path.join(folder, "model_index.json")):
            family.build_tiny(folder, words or [], model_cfg.tiny, seed=seed)
    pipe = load_pipeline(folder, name, dtype)
    if model_cfg.attention == "xformers":
        try:
            pipe.enable_xformers_memory_efficient_attention()
        except Exception as exc:
            raise RuntimeError(f"model.attention=xformers: xformers unavailable ({exc}); use 'sdpa'") from exc
    return models_from_pipe(pipe, device, dtype, model_cfg.max_sequence_length, family, model_cfg.resolution,
                            model_cfg.text_cache_size, model_cfg.decode_batch)
