"""Samplers: CFG velocity, the SDE rollout (Flow-GRPO's policy) and the Euler ODE sampler (evaluation).

Step math is fp32 whatever the network dtype; the step index is a device tensor (no host syncs inside the loop).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import ops
from ..utils.seeding import draw


@dataclass
class Conditioning:
    """Cached text embeddings for B trajectories: embeds (B,S,D), pooled (B,P); the CFG negative the same shapes
    (a family without a CFG batch, FLUX-dev, never reads the negative). Code outside the family treats it as an
    opaque bundle: `tensors()` / `from_tensors()` / `index()`."""
    embeds: torch.Tensor
    pooled: torch.Tensor
    neg_embeds: torch.Tensor
    neg_pooled: torch.Tensor

    def tensors(self) -> tuple:
        """The bundle as a flat tuple (what a captured graph copies into its static inputs)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @classmethod
    def from_tensors(cls, tensors) -> "Conditioning":
        return cls(*tensors)

    def index(self, idx) -> "Conditioning":
        return self.from_tensors(t[idx] for t in self.tensors())


class GuidedVelocity:
    """v = v_u + w (v_c - v_u) from one batched forward over [uncond; cond] (w <= 1: cond only). Counts NFEs.

    family (models.family, default SD3) says how the network is called; a family without a CFG batch (FLUX-dev)
    gets w as its guidance input and runs one forward per sample.

    grad_uncond=False (training with train.cfg_grad=cond, Flow-GRPO's choice): the unconditional branch is a
    constant for autograd, v = sg(v_u) + w (v_c - sg(v_u)). It then runs as its own no-grad forward and only the
    conditional rows are kept for the backward: the same values and gradient as detaching v_u after a joint forward,
    with half the rows in the backward pass. The layout is the same with and without autograd, so a no-grad pass
    (train.old_log_prob=recompute) reproduces the training forward exactly."""

    def __init__(self, transformer, guidance: float, grad_uncond: bool = True, family=None):
        from ..models.family import SD3Family
        self.transformer = transformer
        self.guidance = guidance
        self.grad_uncond = grad_uncond
        self.family = family or SD3Family()
        self.cfg = self.family.cfg_batch and guidance > 1.0
        self.nfe = 0          # network evaluations, counted per sample (CFG counts 2)

    def _forward(self, z, t, embeds, pooled, dt, odt):
        return self.family.call(self.transformer, z.to(dt), t, embeds, pooled, self.guidance).to(odt)

    def __call__(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """z (B,C,h,w), t (B,) timesteps in [0, 1000] -> v (B,C,h,w) fp32 (fp64 for an fp64 network)."""
        dt = next(self.transformer.parameters()).dtype
        odt = torch.float64 if dt == torch.float64 else torch.float32
        if self.cfg and not self.grad_uncond:
            with torch.no_grad():
                vu = self._forward(z, t, cond.neg_embeds, cond.neg_pooled, dt, odt)
            vc = self._forward(z, t, cond.embeds, cond.pooled, dt, odt)
            self.nfe += 2 * z.shape[0]
            return vu + self.guidance * (vc - vu)
        if self.cfg:
            out = self._forward(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond.neg_embeds, cond.embeds]),
                                torch.cat([cond.neg_pooled, cond.pooled]), dt, odt)
            vu, vc = out.chunk(2)
            self.nfe += 2 * z.shape[0]
            return vu + self.guidance * (vc - vu)
        self.nfe += z.shape[0]
        return self._forward(z, t, cond.embeds, cond.pooled, dt, odt)


@dataclass
class Trajectory:
    latents: torch.Tensor    # (B, T+1, C, h, w) fp32: z_0 = noise ... z_T
    log_probs: torch.Tensor  # (B, T) fp32, log-prob of z_{k+1} given z_k under the sampling policy


@torch.no_grad()
def sde_rollout(velocity: GuidedVelocity, cond: Conditioning, z0: torch.Tensor, sigmas: torch.Tensor,
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
        v = velocity(z, sigmas[kk] * 1000.0, cond)
        eps = draw(noise, z.shape, z.device).to(fdt)
        z, lp = ops.sde_step(z, v, sigmas, noise_levels, kk, eps, variant, reduction, cps_logprob)
        lats.append(z)
        lps.append(lp)
    return Trajectory(torch.stack(lats, 1), torch.stack(lps, 1))


@torch.no_grad()
def ode_sample(velocity: GuidedVelocity, cond: Conditioning, z: torch.Tensor, sigmas: torch.Tensor,
               start: int = 0) -> torch.Tensor:
    """Euler ODE from z at sigma_start to sigma_T = 0: z <- z + v (sigma_{k+1} - sigma_k). -> (B,C,h,w) fp32."""
    B = z.shape[0]
    z = z.float()
    for k in range(start, sigmas.numel() - 1):
        kk = torch.full((B,), k, dtype=torch.long, device=z.device)
        v = velocity(z, sigmas[kk] * 1000.0, cond)
        z = z + v * (sigmas[k + 1] - sigmas[k])
    return z
