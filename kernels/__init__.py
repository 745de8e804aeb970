"""Triton kernels (installed as `densegrpo_fast.kernels`): the same entry points as the C++ extension `_C`.

Each op file holds its `@triton.jit` kernels and a plain launcher with the `_C` signature; the autograd wrappers
and the per-sample scalar math live in `densegrpo_fast.ops`. Runs on CUDA, or on CPU under TRITON_INTERPRET=1.
"""
from .grpo_loss import grpo_loss_forward
from .sde_logprob import sde_logprob_backward, sde_logprob_forward
from .sde_step import sde_step

__all__ = ["sde_step", "sde_logprob_forward", "sde_logprob_backward", "grpo_loss_forward"]
