"""Held-out evaluation: Euler ODE sampler (sampling.eval_steps, CFG eval.guidance), rewards, optional sample grid."""
from __future__ import annotations

import os

import torch

from .rollout.sampler import GuidedVelocity, ode_sample
from .train.distributed import all_gather_cat


@torch.no_grad()
def evaluate_prompts(trainer, prompts: list[str], epoch: int) -> dict:
    cfg = trainer.cfg
    if cfg.eval.max_prompts:
        prompts = prompts[:cfg.eval.max_prompts]
    n = len(prompts)
    per = -(-n // trainer.world)
    mine = list(range(trainer.rank * per, min(n, (trainer.rank + 1) * per)))
    trainer.engine.module.eval()
    velocity = GuidedVelocity(trainer.engine.module, cfg.eval.guidance)
    scores = torch.full((per,), float("nan"))
    images_all = []
    bs = cfg.sampling.sample_batch
    for s in range(0, len(mine), bs):
        idx = mine[s:s + bs]
        ps = [prompts[i] for i in idx]
        g = torch.Generator(device=trainer.device).manual_seed(10_000 + idx[0])  # fixed noise per prompt
        z0 = torch.randn((len(idx), *trainer.models.latent_shape), generator=g, device=trainer.device)
        z = ode_sample(velocity, trainer.conditioning(ps), z0, trainer.eval_sched.sigmas)
        images = trainer.models.decode(z)
        r, _ = trainer.reward(images, ps)
        scores[s:s + len(idx)] = r
        images_all.append(images.cpu())
    gathered = all_gather_cat(scores.to(trainer.device)).cpu()[:n]
    out = {"eval_reward_mean": gathered.nanmean().item()}
    if trainer.main and cfg.eval.grid and images_all:
        from .utils.images import save_grid
        save_grid(torch.cat(images_all)[:16], [prompts[i] for i in mine[:16]],
                  os.path.join(trainer.run_dir, "samples", f"eval_epoch{epoch}.png"))
    return out
