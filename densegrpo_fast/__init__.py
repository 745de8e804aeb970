"""densegrpo_fast: GRPO with dense step-wise rewards for flow-matching text-to-image models.

Data flow, one subpackage per stage: prompts -> rollout (SDE steps, ODE completions) -> rewards ->
credit (sparse, dense, turning point, branching) -> loss -> train (DeepSpeed engine, optimizer, checkpoints).
"""
__version__ = "0.1.0"
