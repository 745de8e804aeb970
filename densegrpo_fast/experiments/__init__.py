"""Experiments: `densegrpo compare` (methods at equal training seconds; its method presets are methods/*.yaml) and
the research studies, each runnable as `python -m densegrpo_fast.experiments.NAME` from the repository root:
stability_study (training settings on the validation split), eval_ci_study (the held-out score's CI against samples
per prompt and ODE steps), pooled_vs_flow (a compare.json's differences to Flow-GRPO, Bonferroni-corrected)."""
