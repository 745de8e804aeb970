"""Held-out evaluation: Euler ODE samples (sampling.eval_steps, the config's shift and CFG) from noise keyed by
(eval.seed, prompt i, sample j), rewards, and for the shapes benchmark the verifier's strict accuracy per category with
a bootstrap CI over prompts and the paired difference to the evaluation before training.

  sampling.py  eval_noise, generate: (N,) (prompt, sample) pairs -> images (N, 3, H, W) in [0, 1]; resolve_eval_batch
  evaluate.py  EvalContext, evaluate_prompts: the evaluation during training (rank-sharded) -> eval_* metrics
  base.py      base_evaluation, base_eval_key: the evaluation before training, reused across identical runs
  report.py    shapes_report, diff_to_base, save_verdict_grid
  folder.py    shapes_eval_from_folder (`densegrpo eval`), DEFAULT_MODEL
"""
from .base import base_eval_key, base_evaluation  # noqa: F401
from .evaluate import EvalContext, evaluate_prompts  # noqa: F401
from .folder import DEFAULT_MODEL, shapes_eval_from_folder  # noqa: F401
from .report import diff_to_base, save_verdict_grid, shapes_report  # noqa: F401
from .sampling import eval_noise, generate, resolve_eval_batch  # noqa: F401
