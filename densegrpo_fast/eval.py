"""Held-out evaluation: Euler ODE sampler (sampling.eval_steps, the config's shift and CFG), rewards, and for the
shapes benchmark the verifier's strict accuracy per category (overall = mean over categories, as GenEval reports),
with a bootstrap CI over prompts and the paired difference to the evaluation before training (same images' noise)
with its CI, JSON, per-image records and a PNG grid with verdicts.

The noise of sample j of prompt i is seeded by (eval.seed, i, j), not by the training seed: evaluations before and
after training, of every method and every training seed, use the same noise (paired comparisons).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from .rollout.sampler import GuidedVelocity, ode_sample
from .train.distributed import all_gather_cat, raise_if_any_failed

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes_sd3_tiny")


def eval_noise(latent_shape, pairs: list[tuple[int, int]], seed: int, device) -> torch.Tensor:
    """(N, C, h, w): one fixed noise per (prompt index, sample index)."""
    out = []
    for i, j in pairs:
        g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + i * 1009 + j)
        out.append(torch.randn(latent_shape, generator=g))
    return torch.stack(out).to(device)


@torch.no_grad()
def generate(transformer, text, decode, latent_shape, prompts: list[str], pairs, sigmas: torch.Tensor,
             guidance: float, seed: int, device, family, batch: int = 256, progress: bool = False,
             desc: str = "eval") -> torch.Tensor:
    """ODE samples for prompts[i] at noise (i, j) for each (i, j) in pairs -> images (N,3,H,W) in [0,1], on CPU.

    sigmas (T+1,): the evaluation schedule (NoiseSchedule(eval_steps, shift).sigmas). batch: samples per ODE batch
    (eval.batch; CFG doubles the network batch): a batch that runs out of device memory is halved and retried, so
    the run keeps the largest that fits. Each sample's noise is its own (eval_noise), whatever the batch.
    progress: a bar over the images with the expected remaining seconds."""
    from tqdm.auto import tqdm
    velocity = GuidedVelocity(transformer, guidance, family)
    imgs = []
    bar = tqdm(total=len(pairs), desc=desc, unit="img", disable=not progress, leave=False)
    s = 0
    while s < len(pairs):
        chunk = pairs[s:s + max(1, batch)]
        try:
            cond = text.conditioning([prompts[i] for i, _ in chunk])
            z = ode_sample(velocity, cond, eval_noise(latent_shape, chunk, seed, device), sigmas)
            imgs.append(decode(z).cpu())
        except torch.OutOfMemoryError:
            if batch <= 1:
                raise
            batch //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            bar.write(f"{desc}: out of memory at {len(chunk)} samples per batch; retrying with {batch}")
            continue
        s += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return torch.cat(imgs) if imgs else torch.empty(0)


def shapes_report(strict: np.ndarray, partial: np.ndarray, categories: list[str]) -> dict:
    from .prompts.shapes import CATEGORIES
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
    from .stats import paired_bootstrap_diff
    d, lo, hi = paired_bootstrap_diff(strict.astype(float), np.array(base["strict"], float),
                                      np.array([i for i, _ in pairs]), np.array(cats), n_boot=1000, seed=epoch + 1)
    return {"eval_diff_base": d, "eval_diff_base_ci_lo": lo, "eval_diff_base_ci_hi": hi}


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
    _tree_digest(h, os.path.dirname(os.path.abspath(__file__)), (".py",))
    return h.hexdigest()[:24]


def base_evaluation(trainer) -> dict:
    """The evaluation before training (epoch -1). With eval.base_cache set (compare sets it), a run whose
    base_eval_key matches a stored one reuses its figures and per-image record instead of generating the same images
    again; a miss evaluates and stores them (atomically). The hit/miss decision is agreed across ranks."""
    from .train.distributed import agree_any
    from .utils.io import atomic_write_json
    folder = trainer.cfg.eval.base_cache
    if not folder:
        return trainer.evaluate(-1)
    folder = os.path.join(folder, base_eval_key(trainer.cfg, trainer.device))
    row_path, rec_path = os.path.join(folder, "row.json"), os.path.join(folder, "epoch-1.json")
    if not agree_any(not (os.path.isfile(row_path) and os.path.isfile(rec_path)), trainer.device):
        with open(row_path) as f:
            row = json.load(f)
        if trainer.main:
            with open(rec_path) as f:
                atomic_write_json(os.path.join(trainer.run_dir, "evals", "epoch-1.json"), json.load(f))
            print(f"evaluation before training: reused from {folder}", flush=True)
        return row
    row = trainer.evaluate(-1)
    if trainer.main:
        with open(os.path.join(trainer.run_dir, "evals", "epoch-1.json")) as f:
            atomic_write_json(rec_path, json.load(f))
        atomic_write_json(row_path, row)  # written last: its presence marks a complete entry
    return row


def save_verdict_grid(images: torch.Tensor, prompts: list[str], strict, path: str, limit: int = 32) -> None:
    from .utils.images import save_grid
    caps = [f"{'OK' if s else 'X'} {p}" for p, s in zip(prompts, strict)]
    save_grid(images[:limit], caps[:limit], path, cols=8)


@torch.no_grad()
def evaluate_prompts(trainer, prompts: list[str], epoch: int) -> dict:
    """The trainer's evaluation (EMA weights swapped in by the caller); rank-sharded, gathered on every rank."""
    cfg = trainer.cfg
    spp = cfg.eval.samples_per_prompt
    if cfg.eval.max_prompts:
        prompts = prompts[:cfg.eval.max_prompts]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(spp)]
    per = -(-len(pairs) // trainer.world)
    mine = pairs[trainer.rank * per:(trainer.rank + 1) * per]
    trainer.engine.module.eval()
    shapes = cfg.prompts.source == "shapes"
    texts = [prompts[i] for i, _ in mine]
    local = torch.full((per, 3 if shapes else 1), float("nan"))
    error = None
    try:  # a failure here (the reward, say) is agreed on below: every rank stops, none waits in the gather
        images = generate(trainer.engine.module, trainer.models.text, trainer.models.decode,
                          trainer.models.latent_shape, prompts, mine, trainer.eval_sched.sigmas, cfg.eval.guidance,
                          cfg.eval.seed, trainer.device, trainer.models.family, cfg.eval.batch,
                          progress=trainer.main and cfg.run.progress, desc=f"eval {epoch}")
        reward, _ = trainer.reward(images, texts) if len(mine) else (torch.zeros(0), None)
        cols = [reward]
        if shapes:
            from .rewards.shapes_verifier import ShapesVerifier
            part, strict = ShapesVerifier()(images, texts)
            cols += [torch.from_numpy(part).float(), torch.from_numpy(strict).float()]
        if len(mine):
            local[:len(mine)] = torch.stack(cols, 1)
    except Exception as exc:
        error = exc
    raise_if_any_failed(error, trainer.device, f"evaluation after epoch {epoch}")
    allv = all_gather_cat(local.to(trainer.device)).cpu()[:len(pairs)]
    out = {"eval_reward_mean": allv[:, 0].mean().item()}
    record = {"epoch": epoch, "prompts": prompts, "pairs": pairs, "reward": allv[:, 0].tolist()}
    if shapes:
        from .prompts.shapes import by_text
        from .stats import bootstrap_ci
        specs = by_text()
        cats = [specs[prompts[i]].category for i, _ in pairs]
        strict = allv[:, 2].numpy() > 0.5
        rep = shapes_report(strict, allv[:, 1].numpy(), cats)
        _, lo, hi = bootstrap_ci(strict.astype(float), np.array([i for i, _ in pairs]), np.array(cats), n_boot=1000,
                                 seed=epoch + 1)
        out.update({"eval_strict_accuracy": rep["strict_accuracy"], "eval_strict_ci_lo": lo, "eval_strict_ci_hi": hi,
                    "eval_partial": rep["partial_score"],
                    **{f"eval_acc_{c}": v for c, v in rep["per_category"].items()}})
        record.update(strict=strict.astype(int).tolist(), partial=allv[:, 1].tolist(), categories=cats)
        out.update(diff_to_base(trainer.run_dir, epoch, prompts, pairs, strict, cats))
    if trainer.main:  # per-image results: paired comparisons across runs (same eval.seed -> same noise per pair)
        from .utils.io import atomic_write_json
        atomic_write_json(os.path.join(trainer.run_dir, "evals", f"epoch{epoch}.json"), record)
    if trainer.main and cfg.eval.grid and len(mine):
        verdicts = cols[2].numpy() > 0.5 if shapes else [True] * len(mine)
        save_verdict_grid(images, texts, verdicts, os.path.join(trainer.run_dir, "samples", f"eval_epoch{epoch}.png"))
    return out


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
    from .config import EvalConfig
    from .models import load_pipeline
    from .models.base import compile_transformer, models_from_pipe
    from .models.registry import family_of_folder, get_family
    from .prompts.shapes import load_split
    from .rewards.shapes_verifier import ShapesVerifier
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
    batch = batch or EvalConfig().batch
    t0 = time.perf_counter()
    images = generate(pipe.transformer, m.text, m.decode, m.latent_shape, prompts, pairs,
                      m.sigmas(steps, shift, device=device), guidance, seed, device, m.family, batch,
                      progress=progress)
    sample_s = time.perf_counter() - t0
    texts = [prompts[i] for i, _ in pairs]
    part, strict = ShapesVerifier()(images, texts)
    cats = [specs[i].category for i, _ in pairs]
    rep = shapes_report(strict, part, cats)
    from .stats import bootstrap_ci
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
