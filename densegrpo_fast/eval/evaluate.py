"""Held-out evaluation during training: the ODE samples of (prompt i, sample j) pairs, rank-sharded, scored by the
reward (and the shapes verifier: partial and strict per image) and gathered -> eval_* metrics, evals/epoch<e>.json
(per-image records) and a grid PNG. It receives an EvalContext, never the trainer."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..train.distributed import all_gather_cat, raise_if_any_failed
from .report import diff_to_base, save_verdict_grid, shapes_report
from .sampling import generate


@dataclass
class EvalContext:
    cfg: object                 # config.Config
    transformer: object         # the network evaluated (the caller swaps the weights it evaluates in)
    models: object              # models.base.Models: text cache, decode, latent_shape, family
    sigmas: torch.Tensor        # (eval_steps + 1,) the evaluation schedule (Euler ODE)
    reward: object              # rewards.CombinedReward
    rank: int
    world: int
    device: torch.device
    run_dir: str                # evals/ and samples/ are written under it (by the main rank)
    main: bool
    progress: bool              # show a progress bar over the images


@torch.no_grad()
def evaluate_prompts(ctx: EvalContext, prompts: list[str], epoch: int) -> dict:
    """The evaluation of `prompts` (eval.max_prompts of them) x eval.samples_per_prompt; rank-sharded, gathered on
    every rank."""
    cfg = ctx.cfg
    spp = cfg.eval.samples_per_prompt
    if cfg.eval.max_prompts:
        prompts = prompts[:cfg.eval.max_prompts]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(spp)]
    per = -(-len(pairs) // ctx.world)
    mine = pairs[ctx.rank * per:(ctx.rank + 1) * per]
    ctx.transformer.eval()
    shapes = cfg.prompts.source == "shapes"
    texts = [prompts[i] for i, _ in mine]
    local = torch.full((per, 3 if shapes else 1), float("nan"))
    error = None
    try:  # a failure here (the reward, say) is agreed on below: every rank stops, none waits in the gather
        images = generate(ctx.transformer, ctx.models.text, ctx.models.decode, ctx.models.latent_shape, prompts, mine,
                          ctx.sigmas, cfg.eval.guidance, cfg.eval.seed, ctx.device, ctx.models.family, cfg.eval.batch,
                          progress=ctx.progress, desc=f"eval {epoch}")
        reward, _ = ctx.reward(images, texts) if len(mine) else (torch.zeros(0), None)
        cols = [reward]
        if shapes:
            from ..rewards.shapes_verifier import ShapesVerifier
            part, strict = ShapesVerifier()(images, texts)
            cols += [torch.from_numpy(part).float(), torch.from_numpy(strict).float()]
        if len(mine):
            local[:len(mine)] = torch.stack(cols, 1)
    except Exception as exc:
        error = exc
    raise_if_any_failed(error, ctx.device, f"evaluation after epoch {epoch}")
    allv = all_gather_cat(local.to(ctx.device)).cpu()[:len(pairs)]
    out = {"eval_reward_mean": allv[:, 0].mean().item()}
    record = {"epoch": epoch, "prompts": prompts, "pairs": pairs, "reward": allv[:, 0].tolist()}
    if shapes:
        from ..prompts.shapes import by_text
        from ..stats import bootstrap_ci
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
        out.update(diff_to_base(ctx.run_dir, epoch, prompts, pairs, strict, cats))
    if ctx.main:  # per-image results: paired comparisons across runs (same eval.seed -> same noise per pair)
        from ..utils.io import atomic_write_json
        atomic_write_json(os.path.join(ctx.run_dir, "evals", f"epoch{epoch}.json"), record)
    if ctx.main and cfg.eval.grid and len(mine):
        verdicts = cols[2].numpy() > 0.5 if shapes else [True] * len(mine)
        save_verdict_grid(images, texts, verdicts, os.path.join(ctx.run_dir, "samples", f"eval_epoch{epoch}.png"))
    return out
