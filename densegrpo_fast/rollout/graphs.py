"""CUDA graphs for the rollout: one captured graph per input shape, replayed with static buffers.

`GraphedVelocity` wraps a GuidedVelocity (transformer forward with CFG): each batch shape — the rollout's B and each
staircase shape B(1+j) — gets its own graph; all graphs share one memory pool (`shared_pool`). The SDE step itself
(the fused `sde_step`) runs outside the graph, between replays. On CPU, or with graphs disabled, it calls straight
through (the same code path as eager). Capture happens after `warmup` eager calls on a side stream, as
torch.cuda.graphs requires; inputs are copied into the static buffers and outputs cloned out, so a caller may keep
what it gets across replays.
"""
from __future__ import annotations

import torch

from ..models.base import Cond


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

    def __call__(self, z: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        if not (self.enabled and z.is_cuda):
            return self.velocity(z, t, cond)
        args = (z, t, *cond.tensors())
        key = (cond.names, _key(*args))
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] <= self.warmup:
                return self.velocity(z, t, cond)
            static_in = [a.clone() for a in args]
            graph, out, nfe = capture(lambda z, t, *c: self.velocity(z, t, cond.from_tensors(c)),
                                      static_in, self.velocity)
            entry = self.graphs[key] = (static_in, out, graph, nfe)
        static_in, static_out, graph, nfe = entry
        for dst, src in zip(static_in, args):
            dst.copy_(src)
        graph.replay()
        self.velocity.nfe += nfe
        return static_out.clone()
