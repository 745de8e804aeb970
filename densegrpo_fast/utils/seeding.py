"""Deterministic random streams keyed by tuples of integers.

Every random draw of a run is keyed by what it is for, never by the process that happens to draw it: the noise of
trajectory r is keyed by (seed, epoch, r, tag) with r its *global* index, so a run's samples do not depend on how
many ranks share it, and a resumed run replays the same draws. Keys are folded into a 62-bit seed by a fixed
polynomial (not `hash()`, which Python salts per process).
"""
from __future__ import annotations

from typing import Sequence

import torch

# Tags: one per kind of draw, so two streams with otherwise equal keys never coincide.
TAG_INITIAL_NOISE = 3
TAG_SDE_NOISE = 4
TAG_WINDOW = 5
TAG_PROMPTS = 7
TAG_BRANCH_NOISE = 9
TAG_PAIRS = 11


def fold(*parts: int) -> int:
    """(p_0, p_1, ...) -> a seed in [0, 2^62): s = (s * 1000003 + p_i) mod 2^62."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2 ** 62)
    return s


def generator(device, *parts: int) -> torch.Generator:
    """A torch.Generator on `device` seeded from the key `parts`."""
    g = torch.Generator(device=device)
    g.manual_seed(fold(*parts))
    return g


class RowNoise:
    """One independent normal stream per row: `randn(shape)` -> (B, *shape), row i drawn from the generator keyed
    by keys[i]. Successive calls continue each row's stream (step 0, step 1, ...)."""

    def __init__(self, device, keys: Sequence[Sequence[int]]):
        self.device = torch.device(device)
        self.gens = [generator(self.device, *k) for k in keys]

    def __len__(self) -> int:
        return len(self.gens)

    def randn(self, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if not self.gens:
            return torch.empty(0, *shape, dtype=dtype, device=self.device)
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype)
                            for g in self.gens])


def draw(noise, shape, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, *rest) normal noise from a RowNoise (per-row streams) or a single torch.Generator (one stream)."""
    if isinstance(noise, RowNoise):
        return noise.randn(tuple(shape[1:]), dtype)
    return torch.randn(tuple(shape), generator=noise, device=device, dtype=dtype)
