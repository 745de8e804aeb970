"""Samplers: CFG velocity, the SDE rollout (Flow-GRPO's policy) and the Euler ODE sampler (evaluation).

Step math is fp32 whatever the network dtype; the step index is a device tensor (no host syncs inside the loop).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..models.base import Cond
from ..utils.seeding import draw


class GuidedVelocity:
    """The velocity a sampler calls: the family's guided velocity (its guidance rule and timestep convention) in fp32
    step math, with the network evaluations counted (CFG counts 2 per sample).

    grad_uncond=False (training with train.cfg_grad=cond, Flow-GRPO's choice): a CFG family's unconditional branch
    is a constant for autograd, v = sg(v_u) + w (v_c - sg(v_u)); it runs as its own no-grad forward and only the
    conditional rows are kept for the backward (models.base.cfg_velocity)."""

    def __init__(self, transformer, guidance: float, family, grad_uncond: bool = True):
        self.transformer = transformer
        self.guidance = guidance
        self.grad_uncond = grad_uncond
        self.family = family
        self.cfg = family.nfe_per_sample(guidance) > 1
        self.nfe = 0          # network evaluations, counted per sample (CFG counts 2)

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """z (B,C,h,w), sigma (B,) in [0, 1] -> v (B,C,h,w) fp32 (fp64 for an fp64 network)."""
        dt = next(self.transformer.parameters()).dtype
        odt = torch.float64 if dt == torch.float64 else torch.float32
        self.nfe += self.family.nfe_per_sample(self.guidance) * z.shape[0]
        return self.family.velocity(self.transformer, z.to(dt), sigma, cond, self.guidance,
                                    self.grad_uncond).to(odt)


@dataclass
class Trajectory:
    latents: torch.Tensor    # (B, T+1, C, h, w) fp32: z_0 = noise ... z_T
    log_probs: torch.Tensor  # (B, T) fp32, log-prob of z_{k+1} given z_k under the sampling policy


@torch.no_grad()
def sde_rollout(velocity: GuidedVelocity, cond: Cond, z0: torch.Tensor, sigmas: torch.Tensor,
                noise_levels: torch.Tensor, noise, variant: str = "sde", reduction: str = "mean",
                cps_logprob: str = "faithful") -> Trajectory:
    """z_{k+1} = sde_step(z_k, v(z_k, sigma_k)) for k < T. noise_levels (T,) or (B,T); 0 = Euler step.

    noise: a utils.seeding.RowNoise (one stream per row: a row's samples do not depend on its batch) or a
    torch.Generator (one stream for the batch).
    """
    T = sigmas.numel() - 1
    B = z0.shape[0]
    fdt = torch.float64 if z0.dtype == torch.float64 else torch.float32
    z = z0.to(fdt)
    lats, lps = [z], []
    for k in range(T):
        kk = torch.full((B,), k, dtype=torch.long, device=z.device)
        v = velocity(z, sigmas[kk], cond)
        eps = draw(noise, z.shape, z.device).to(fdt)
        z, lp = ops.sde_step(z, v, sigmas, noise_levels, kk, eps, variant, reduction, cps_logprob)
        lats.append(z)
        lps.append(lp)
    return Trajectory(torch.stack(lats, 1), torch.stack(lps, 1))


@torch.no_grad()
def ode_sample(velocity: GuidedVelocity, cond: Cond, z: torch.Tensor, sigmas: torch.Tensor,
               start: int = 0) -> torch.Tensor:
    """Euler ODE from z at sigma_start to sigma_T = 0: z <- z + v (sigma_{k+1} - sigma_k). -> (B,C,h,w) fp32."""
    B = z.shape[0]
    z = z.float()
    for k in range(start, sigmas.numel() - 1):
        kk = torch.full((B,), k, dtype=torch.long, device=z.device)
        v = velocity(z, sigmas[kk], cond)
        z = z + v * (sigmas[k + 1] - sigmas[k])
    return z
