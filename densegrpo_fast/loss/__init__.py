"""The GRPO objective lives with its fused kernels: see `densegrpo_fast.ops.grpo_loss` (dispatch) and
`densegrpo_fast.ops.reference.grpo_loss` (the formula)."""
from ..ops import grpo_loss  # noqa: F401
