"""Rewards: `images (B,3,H,W) float in [0,1], prompts list[str] -> (B,) float32 tensor`, combined by weights.

Images reach a reward on the device they were decoded on (a learned reward runs there; CPU rewards copy what they
need). Learned rewards: rewards/clip.py (PickScore, CLIP score, LAION aesthetic).

Register a reward with `@register("name")` on a factory `(config) -> callable`. A reward that raises, returns the
wrong shape, or returns NaN/inf fails with `RewardError` naming it: never a silent zero.
"""
from __future__ import annotations

import inspect
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .registry import COMPONENT_KEYS, REWARDS, Reward, RewardError, register  # noqa: F401  (the public names)


class CombinedReward:
    """sum_i w_i R_i(images, prompts); also returns each component (for metrics)."""

    def __init__(self, weights: dict, cfg=None, threads: int = 2, rank: int = 0, components: dict | None = None):
        """weights: name -> weight (each name a registered reward), or components: name -> {weight, type?, ...}
        (reward.components; the other keys go to the reward's factory as keyword arguments)."""
        specs = components or {n: {"weight": w} for n, w in weights.items()}
        unknown = [n for n, s in specs.items() if s.get("type", n) not in REWARDS]
        if unknown:
            raise RewardError(f"reward: unknown reward(s) {unknown}; available: {sorted(REWARDS)}")
        self.weights = {n: float(s["weight"]) for n, s in specs.items()}
        self.types = {n: s.get("type", n) for n, s in specs.items()}
        self.fns = {}
        for n, s in specs.items():
            factory = REWARDS[self.types[n]]
            opts = {k: v for k, v in s.items() if k not in ("weight", "type")}
            try:  # check the options against the factory's signature before building anything
                inspect.signature(factory).bind(cfg, **opts)
            except TypeError as exc:
                raise RewardError(f"reward.components.{n}: the {self.types[n]} reward does not take "
                                  f"{sorted(opts)} ({exc})") from None
            self.fns[n] = factory(cfg, **opts)
        self.pool = ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="reward")
        self.calls = 0                  # batched calls made (counted where they happen, in the reward threads)
        self.images = 0                 # images scored
        self._lock = threading.Lock()
        from ..utils import faults
        self._fail = faults.reward_fails(rank)  # fault injection (tests): every call on this rank raises

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict]:
        images = images.detach()
        total = torch.zeros(images.shape[0], dtype=torch.float32)
        parts = {}
        for name, fn in self.fns.items():
            try:
                if self._fail:
                    raise RuntimeError("injected failure (DENSEGRPO_FAULT=reward_error)")
                r = fn(images, prompts)
            except Exception as exc:
                raise RewardError(f"reward '{name}' failed on a batch of {len(prompts)}: "
                                  f"{type(exc).__name__}: {exc}") from exc
            r = torch.as_tensor(r, dtype=torch.float32).detach().cpu().reshape(-1)
            if r.numel() != images.shape[0]:
                raise RewardError(f"reward '{name}' returned {r.numel()} values for {images.shape[0]} images")
            if not torch.isfinite(r).all():
                bad = (~torch.isfinite(r)).nonzero().flatten().tolist()[:5]
                raise RewardError(f"reward '{name}' returned NaN/inf for images {bad} "
                                  f"(prompts {[prompts[i] for i in bad]})")
            parts[name] = r
            total += self.weights[name] * r
        with self._lock:
            self.calls += 1
            self.images += images.shape[0]
        return total, parts

    def check_prompts(self, prompts: list[str], where: str) -> None:
        """Before any work: each component that constrains its prompts (an optional `check_prompts(prompts, where)`
        on the reward, e.g. ocr's quoted targets) checks them all, raising an error that names the prompt."""
        for fn in self.fns.values():
            if callable(getattr(fn, "check_prompts", None)):
                fn.check_prompts(prompts, where)

    def close(self) -> None:
        """Stop the reward threads and release each component (a component may define close())."""
        self.pool.shutdown(wait=True)
        for fn in self.fns.values():
            if callable(getattr(fn, "close", None)):
                fn.close()

    def submit(self, images: torch.Tensor, prompts: list[str], decode=None) -> Future:
        """Score in the thread pool while the caller goes on -> Future of (total (B,), parts). The images are copied
        to the host first; with `decode` (latents (B, C, h, w) -> images (B, 3, H, W)), `images` are latents, decoded
        in the reward thread and scored on the device they were decoded on."""
        prompts = list(prompts)
        if decode is None:
            return self.pool.submit(self.__call__, images.detach().float().cpu(), prompts)
        return self.pool.submit(lambda: self(decode(images), prompts))


from . import clip  # noqa: E402,F401  (registers)
from . import jpeg  # noqa: E402,F401  (registers)
from . import ocr  # noqa: E402,F401  (registers; rapidocr is imported on first use)
from . import remote  # noqa: E402,F401  (registers)
from . import shapes_verifier  # noqa: E402,F401  (registers)
