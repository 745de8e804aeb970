"""The sampling set-up from a config, shared by the trainer, calibration and diagnose: the model seam, the reward, the
rollout schedule (sigmas (T+1,), noise levels (T,)), the evaluation schedule, the CFG velocity, the train prompts.

build_sampling(cfg, device, work_dir) -> Sampling(models, reward, sched, velocity, prompts) for a sampler without
training; the trainer uses the pieces (load_models, rollout_schedule, eval_schedule, build_reward) around LoRA,
DeepSpeed and its graphed velocity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .sampler import GuidedVelocity
from .schedule import NoiseSchedule, load_noise_levels


@dataclass
class Sampling:
    models: object              # models.base.Models
    reward: object              # rewards.CombinedReward
    sched: NoiseSchedule        # the rollout schedule
    velocity: GuidedVelocity    # the CFG velocity of models.transformer
    prompts: list               # the train split


def load_models(cfg, device, words: Optional[list] = None, work_dir: Optional[str] = None):
    """The model seam of cfg.model on `device` (a tiny model is built into work_dir from the vocabulary `words`)."""
    from ..models import build_models
    return build_models(cfg.model, device, words=words, work_dir=work_dir, seed=cfg.run.seed)


def rollout_schedule(cfg, models, device, calibrated: bool = True) -> NoiseSchedule:
    """sampling.steps sigmas at sampling.shift with the noise levels of sampling.noise_schedule_file (calibrated, when
    set and asked) or the uniform sampling.noise_level."""
    sc = cfg.sampling
    levels = load_noise_levels(sc.noise_schedule_file, sc.steps) if calibrated and sc.noise_schedule_file else None
    return NoiseSchedule(models.sigmas(sc.steps, sc.shift), sc.noise_level, device, levels)


def eval_schedule(cfg, models, device) -> NoiseSchedule:
    """sampling.eval_steps sigmas at sampling.shift, noise level 0 (the Euler ODE)."""
    sc = cfg.sampling
    return NoiseSchedule(models.sigmas(sc.eval_steps, sc.shift), 0.0, device)


def build_reward(cfg, threads: int = 1, rank: int = 0):
    """The combined reward of cfg.reward, scoring in `threads` threads."""
    from ..rewards import CombinedReward
    return CombinedReward(cfg.reward.weights, cfg, threads, rank=rank, components=cfg.reward.components)


def build_sampling(cfg, device, work_dir: Optional[str] = None, compile_epochs: Optional[int] = None,
                   calibrated: bool = True) -> Sampling:
    """Models (the tiny model's vocabulary from the train prompts, built into work_dir), reward (one thread),
    rollout schedule and velocity. compile_epochs: compile the transformer as model.compile says for a job of that
    many epochs (models.base.resolve_compile); None: eager. calibrated: use sampling.noise_schedule_file."""
    from ..models.base import compile_transformer, resolve_compile
    from ..prompts import load_prompts, vocabulary
    prompts = load_prompts(cfg.prompts, "train")
    models = load_models(cfg, device, vocabulary(prompts), work_dir)
    if compile_epochs is not None:
        compile_transformer(models.transformer, resolve_compile(cfg.model.compile, models.transformer, compile_epochs,
                                                                0.0, cfg.train.zero_stage)[0])
    reward = build_reward(cfg)
    sched = rollout_schedule(cfg, models, device, calibrated)
    velocity = GuidedVelocity(models.transformer, cfg.sampling.guidance, family=models.family)
    return Sampling(models, reward, sched, velocity, prompts)
