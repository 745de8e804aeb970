"""Flow-matching sigma schedule and the per-step noise-level table, both fp32 tensors on the device.

sigmas (T+1,): SD3's FlowMatchEulerDiscreteScheduler(shift).set_timesteps(T): t_i = linspace(1, 1/1000 shifted),
shifted once more, then 0. `sigma_shift(s) = shift*s / (1 + (shift-1)*s)`.
noise_levels (T,): the per-step `a_k` of the SDE (uniform `a` for Flow-GRPO; DenseGRPO's calibrated psi(k) is
stored as a per-step `a_k`, i.e. s_k = a_k * sqrt(sigma_k / (1 - sigma_k))).
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np
import torch


def sigma_shift(s: np.ndarray, shift: float) -> np.ndarray:
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_sigmas(steps: int, shift: float = 3.0, num_train_timesteps: int = 1000,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """sigma_0 = 1 > ... > sigma_{T-1} > sigma_T = 0, computed in fp64, returned fp32 on `device`."""
    sigma_max = sigma_shift(np.float64(1.0), shift)
    sigma_min = sigma_shift(np.float64(1.0 / num_train_timesteps), shift)
    t = np.linspace(sigma_max, sigma_min, steps, dtype=np.float64)
    sig = np.concatenate([sigma_shift(t, shift), [0.0]])
    return torch.tensor(sig, dtype=torch.float32, device=device)


def uniform_noise_levels(steps: int, level: float, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.full((steps,), float(level), dtype=torch.float32, device=device)


def load_noise_levels(path: str, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A calibrated schedule written by `densegrpo calibrate` (JSON with 'noise_levels': [a_0 .. a_{T-1}])."""
    try:
        with open(path) as f:
            levels = json.load(f)["noise_levels"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"sampling.noise_schedule_file: cannot read '{path}': {exc}") from exc
    if len(levels) != steps:
        raise ValueError(f"sampling.noise_schedule_file: '{path}' has {len(levels)} levels, sampling.steps={steps}")
    return torch.tensor(levels, dtype=torch.float32, device=device)


class NoiseSchedule:
    """The device-resident tables one rollout needs: sigmas (T+1,), noise_levels (T,)."""

    def __init__(self, sigmas: torch.Tensor, noise_level: float, device,
                 noise_levels: Optional[torch.Tensor] = None):
        """sigmas (T+1,): the family's table (Models.sigmas; SD3's is flow_sigmas(T, shift))."""
        steps = sigmas.numel() - 1
        self.steps = steps
        self.sigmas = sigmas.to(device=device, dtype=torch.float32)
        self.noise_levels = (noise_levels.to(device=device, dtype=torch.float32) if noise_levels is not None
                             else uniform_noise_levels(steps, noise_level, device=device))
