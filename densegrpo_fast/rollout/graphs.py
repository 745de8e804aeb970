"""CUDA graphs for the rollout: one captured graph per input shape, replayed with static buffers.

`GraphedVelocity` wraps a GuidedVelocity (transformer forward with CFG): each staircase batch shape B(1+j) gets its
own graph; all graphs share one memory pool (`shared_pool`). `GraphedSDEStep` captures the whole sampling step —
forward, CFG combine and the fused `sde_step` — for a
fixed batch; the step index is a device tensor, so one graph serves every step k. On CPU, or with graphs disabled,
both call straight through (the same code path as eager). Capture happens after `warmup` eager calls on a side stream,
as torch.cuda.graphs requires; inputs are copied into the static buffers and outputs cloned out, so a caller may keep
what it gets across replays.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..utils.seeding import draw
from .sampler import Conditioning


def _key(*ts) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in ts)


_POOL = None


def shared_pool():
    """One CUDA-graph memory pool for every capture of the process: the staircase's graphs share their
    intermediates, so graph memory is that of the largest shape, not the sum over shapes. Safe because replays run
    one after another on one stream and every graph's outputs stay referenced (never handed back to the pool)."""
    global _POOL
    if _POOL is None:
        _POOL = torch.cuda.graph_pool_handle()
    return _POOL


def capture(fn, static_in: list, velocity):
    """Warm fn(*static_in) up on a side stream (twice), capture one call. -> (graph, outputs, NFEs per replay).

    Capture uses the shared pool and thread-local capture mode: the reward thread may decode on the device while
    this thread captures (the global mode would make its kernels an error). The velocity's NFE counter is restored:
    warm-up and capture do no sampling work; replays add their NFEs."""
    start = velocity.nfe
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    before = velocity.nfe
    with torch.cuda.graph(graph, pool=shared_pool(), capture_error_mode="thread_local"):
        out = fn(*static_in)
    nfe = velocity.nfe - before
    velocity.nfe = start
    return graph, out, nfe


class GraphedVelocity:
    def __init__(self, velocity, enabled: bool = True, warmup: int = 2):
        self.velocity = velocity
        self.enabled = enabled
        self.warmup = warmup
        self.graphs: dict = {}
        self.seen: dict = {}

    @property
    def nfe(self) -> int:
        return self.velocity.nfe

    @property
    def guidance(self) -> float:
        return self.velocity.guidance

    @property
    def cfg(self) -> bool:
        return self.velocity.cfg

    def __call__(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if not (self.enabled and z.is_cuda):
            return self.velocity(z, t, cond)
        args = (z, t, *cond.tensors())
        key = _key(*args)
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] <= self.warmup:
                return self.velocity(z, t, cond)
            static_in = [a.clone() for a in args]
            graph, out, nfe = capture(lambda z, t, *c: self.velocity(z, t, Conditioning.from_tensors(c)),
                                      static_in, self.velocity)
            entry = self.graphs[key] = (static_in, out, graph, nfe)
        static_in, static_out, graph, nfe = entry
        for dst, src in zip(static_in, args):
            dst.copy_(src)
        graph.replay()
        self.velocity.nfe += nfe
        return static_out.clone()


class GraphedSDEStep:
    """z_{k+1}, log_prob = sde_step(z_k, v(z_k, sigma_k)) as one graph per batch shape; k is a (B,) device tensor."""

    def __init__(self, velocity, sigmas: torch.Tensor, noise_levels: torch.Tensor, variant: str = "sde",
                 reduction: str = "mean", cps_logprob: str = "faithful", enabled: bool = True):
        self.velocity, self.sigmas, self.levels = velocity, sigmas, noise_levels
        self.kw = dict(variant=variant, reduction=reduction, cps_logprob=cps_logprob)
        self.enabled = enabled
        self.graphs: dict = {}

    def eager(self, z, k, eps, cond):
        v = self.velocity(z, self.sigmas[k] * 1000.0, cond)
        return ops.sde_step(z, v, self.sigmas, self.levels, k, eps, **self.kw)

    def __call__(self, z: torch.Tensor, k: torch.Tensor, eps: torch.Tensor, cond: Conditioning):
        if not (self.enabled and z.is_cuda):
            return self.eager(z, k, eps, cond)
        args = (z, k, eps, *cond.tensors())
        key = _key(*args)
        if key not in self.graphs:
            static_in = [a.clone() for a in args]
            graph, out, nfe = capture(lambda z, k, eps, *c: self.eager(z, k, eps, Conditioning.from_tensors(c)),
                                      static_in, self.velocity)
            self.graphs[key] = (static_in, out, graph, nfe)
        static_in, out, graph, nfe = self.graphs[key]
        for dst, src in zip(static_in, args):
            dst.copy_(src)
        graph.replay()
        self.velocity.nfe += nfe
        return out[0].clone(), out[1].clone()


@torch.no_grad()
def graphed_sde_rollout(step: GraphedSDEStep, cond: Conditioning, z0: torch.Tensor, noise,
                        steps: Optional[int] = None):
    """The SDE rollout driven by a GraphedSDEStep: -> latents (B, T+1, ...), log_probs (B, T)."""
    T = steps or step.sigmas.numel() - 1
    B = z0.shape[0]
    z = z0 if z0.dtype == torch.float64 else z0.float()  # fp64 only for the exactness tests
    lats, lps = [z], []
    for j in range(T):
        k = torch.full((B,), j, dtype=torch.long, device=z.device)
        eps = draw(noise, z.shape, z.device).to(z.dtype)
        z, lp = step(z, k, eps, cond)
        lats.append(z)
        lps.append(lp)
    return torch.stack(lats, 1), torch.stack(lps, 1)
