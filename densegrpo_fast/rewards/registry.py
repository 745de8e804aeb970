"""The reward registry: `@register("name")` on a factory `(cfg, **component options) -> Reward`, the `Reward`
protocol and `RewardError`. Its own module so the reward modules register without importing the package that
imports them (densegrpo_fast.rewards re-exports every name here)."""
from __future__ import annotations

from typing import Callable, Protocol

REWARDS: dict[str, Callable] = {}
# The keys a reward component may have (reward.components.<name>); a factory receives the ones given beside
# `weight` and `type` as keyword arguments.
COMPONENT_KEYS = ("weight", "type", "path", "head", "device", "batch_size", "dtype", "url", "timeout_s", "retries",
                  "token")


class RewardError(RuntimeError):
    pass


class Reward(Protocol):
    """What a registered factory `(cfg, **component options) -> Reward` returns. The options a component may set
    (device, batch_size, dtype, path, head, url, timeout_s, retries, token) reach the factory as keyword arguments;
    the reward batches internally and runs where its `device` says. `close()` is optional (CombinedReward.close
    calls it when present), and so is `check_prompts(prompts, where)` (CombinedReward.check_prompts calls it at
    start-up)."""

    def __call__(self, images, prompts: list) -> "torch.Tensor":
        """images (B,3,H,W) in [0,1] on the decoding device, B prompts -> (B,) scores."""


def register(name: str):
    def deco(factory):
        REWARDS[name] = factory
        return factory
    return deco
