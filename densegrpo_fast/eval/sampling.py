"""Evaluation sampling: the Euler ODE (sampling.eval_steps, the config's shift and CFG) from fixed noise.

The noise of sample j of prompt i is seeded by (eval.seed, i, j), not by the training seed: evaluations before and
after training, of every method and every training seed, use the same noise (paired comparisons).
"""
from __future__ import annotations

import torch

from ..rollout.sampler import GuidedVelocity, ode_sample


# eval.batch = 0: samples per ODE batch by device type. A GPU takes as many as fit (halved on out-of-memory); on the
# CPU the network is fastest when one forward's activations stay in the caches (the shipped tiny SD3 on one core:
# 60-64 ms per sample at 8-32, 69 at 64, 81 at 256; bench/bench_eval_batch.py sweeps it).
AUTO_EVAL_BATCH = {"cuda": 256, "cpu": 32}


def resolve_eval_batch(batch: int, device) -> int:
    """eval.batch -> samples per ODE batch: batch itself when >= 1, else AUTO_EVAL_BATCH for the device's type."""
    if batch >= 1:
        return batch
    return AUTO_EVAL_BATCH.get(torch.device(device).type, AUTO_EVAL_BATCH["cuda"])


def eval_noise(latent_shape, pairs: list[tuple[int, int]], seed: int, device) -> torch.Tensor:
    """(N, C, h, w): one fixed noise per (prompt index, sample index)."""
    out = []
    for i, j in pairs:
        g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + i * 1009 + j)
        out.append(torch.randn(latent_shape, generator=g))
    return torch.stack(out).to(device)


@torch.no_grad()
def generate(transformer, text, decode, latent_shape, prompts: list[str], pairs, sigmas: torch.Tensor,
             guidance: float, seed: int, device, family, batch: int = 0, progress: bool = False,
             desc: str = "eval") -> torch.Tensor:
    """ODE samples for prompts[i] at noise (i, j) for each (i, j) in pairs -> images (N,3,H,W) in [0,1], on CPU.

    sigmas (T+1,): the evaluation schedule (NoiseSchedule(eval_steps, shift).sigmas). batch: samples per ODE batch
    (eval.batch, 0 = auto: resolve_eval_batch; CFG doubles the network batch): a batch that runs out of device
    memory is halved and retried, so the run keeps the largest that fits. Each sample's noise is its own
    (eval_noise), whatever the batch.
    progress: a bar over the images with the expected remaining seconds."""
    from tqdm.auto import tqdm
    velocity = GuidedVelocity(transformer, guidance, family)
    batch = resolve_eval_batch(batch, device)
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
