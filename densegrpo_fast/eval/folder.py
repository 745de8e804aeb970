"""`densegrpo eval`: a pipeline folder (+ LoRA) sampled on a shapes split, verified, written as eval.json + grid.png."""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from .report import save_verdict_grid, shapes_report
from .sampling import generate, resolve_eval_batch

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "shapes_sd3_tiny")


def shapes_eval_from_folder(model: str, lora: Optional[str], split: str = "test", steps: int = 40,
                            guidance: float = 4.5, samples_per_prompt: int = 4, seed: int = 0,
                            out: Optional[str] = None, device: str = "cpu", shift: float = 3.0,
                            max_sequence_length: int = 4, resolution: Optional[int] = None,
                            batch: Optional[int] = None, progress: bool = False, compile: str = "off") -> dict:
    """`densegrpo eval`: load a pipeline folder (+ LoRA), sample the split, verify, write eval.json + grid.png.
    steps / shift / max_sequence_length / resolution / batch: as sampling.eval_steps, sampling.shift,
    model.max_sequence_length, model.resolution and eval.batch of a training config; compile: model.compile for
    the sampler's transformer (its graphs persist in the compile cache, models.base.compile_cache_dir)."""
    import time
    from ..models import load_pipeline
    from ..models.base import compile_transformer, models_from_pipe
    from ..models.registry import family_of_folder, get_family
    from ..prompts.shapes import load_split
    from ..rewards.shapes_verifier import ShapesVerifier
    family = family_of_folder(model)
    pipe = load_pipeline(model, family, torch.float32)
    if lora:
        if not os.path.isdir(lora):
            raise FileNotFoundError(f"--lora: folder '{lora}' not found")
        pipe.load_lora_weights(lora)
    m = models_from_pipe(pipe, device, torch.float32, max_sequence_length, get_family(family), resolution)
    compile_transformer(pipe.transformer, compile)
    specs = load_split(split)
    prompts = [p.text for p in specs]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(samples_per_prompt)]
    batch = resolve_eval_batch(batch or 0, device)
    t0 = time.perf_counter()
    images = generate(pipe.transformer, m.text, m.decode, m.latent_shape, prompts, pairs,
                      m.sigmas(steps, shift, device=device), guidance, seed, device, m.family, batch,
                      progress=progress)
    sample_s = time.perf_counter() - t0
    texts = [prompts[i] for i, _ in pairs]
    part, strict = ShapesVerifier()(images, texts)
    cats = [specs[i].category for i, _ in pairs]
    rep = shapes_report(strict, part, cats)
    from ..stats import bootstrap_ci
    _, lo, hi = bootstrap_ci(strict.astype(float), np.array([i for i, _ in pairs]), np.array(cats), n_boot=2000)
    rep["strict_accuracy_ci95"] = [lo, hi]   # bootstrap over prompts within categories
    rep.update(model=model, lora=lora, split=split, steps=steps, shift=shift, resolution=m.resolution,
               max_sequence_length=max_sequence_length, guidance=guidance,
               samples_per_prompt=samples_per_prompt, seed=seed, batch=batch, compile=compile,
               sample_s=round(sample_s, 1))
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(rep, f, indent=1)
        order = np.argsort([specs[i].category for i, _ in pairs], kind="stable")[::max(1, samples_per_prompt)]
        save_verdict_grid(images[order], [texts[k] for k in order], strict[order], os.path.join(out, "grid.png"),
                          limit=48)
    return rep
