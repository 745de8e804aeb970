"""DenseGRPO's exploration-space calibration (Algorithm 1): a per-step noise level psi(k), fitted before training.

Round r: sample N trajectories with the current levels (staircase completions, the rollout's CFG), compute the raw
gains g_k = Q_{k+1} - Q_k; for each step k: if |#{g_k > 0} - #{g_k < 0}| < eps1 then psi(k) += eps2 else
psi(k) -= eps2 (clamped at 0). psi is stored as the per-step a_k of s_k = a_k sqrt(sigma_k / (1 - sigma_k)), starting
from the uniform a of the config. The result is frozen: `sampling.noise_schedule_file` points training at it.

The paper's psi(k) is the step's noise level s_k itself. Storing a_k = s_k / f_k, f_k = sqrt(sigma_k / (1 - sigma_k))
(1 - sigma_1 in the denominator at sigma = 1, as the SDE step computes it), is the same schedule: the SDE step reads
only s_k = a_k f_k (`noise_scale`, `levels_from_noise`; tests/test_fidelity.py). What differs is the update's unit:
units="level" (the default, as the shipped calibrations were made) moves a_k by eps2, i.e. s_k by eps2 f_k (f_k falls
from 5.0 to 0.09 over the default 10 steps at shift 3); units="noise" (`densegrpo calibrate --units noise`) moves
s_k by eps2, as Algorithm 1 writes it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..utils.io import atomic_write_json


def balance_threshold(gains: torch.Tensor, eps1) -> torch.Tensor:
    """(T,) threshold on |#{g > 0} - #{g < 0}| below which step k counts as balanced.

    eps1 a number: that fixed count (the paper's eps1 = 2). eps1 = "auto" (the default here): 1.96 sqrt(n_k), n_k
    the number of non-zero gains at step k — for a truly balanced step (each non-zero gain positive with
    probability 1/2) the difference is approximately N(0, n_k), so it is recognised as balanced with probability
    about 0.95 whatever N is. With eps1 = 2 and N = 32 it would be only when the counts are exactly equal, i.e.
    about 14 % of the time, and the rule would drift toward less noise wherever gains are non-zero. The auto
    threshold is at least 1, so a step whose gains are all exactly zero (no evidence either way; imbalance 0) counts as
    balanced, as under the paper's rule (|0| < 2)."""
    if eps1 == "auto":
        return (1.96 * (gains != 0).sum(0).double().sqrt()).clamp(min=1.0)
    return torch.full((gains.shape[1],), float(eps1), dtype=torch.float64)


def noise_scale(sigmas: torch.Tensor) -> torch.Tensor:
    """(T+1,) sigmas -> (T,) f_k with s_k = a_k f_k for the "sde" variant (as ops.reference.step_coefficients)."""
    sig = sigmas.double()
    sigma = sig[:-1]
    denom = 1.0 - torch.where(sigma == 1.0, sig[1], sigma)
    return torch.sqrt(sigma / denom)


def levels_from_noise(noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The paper's psi(k) = s_k -> the stored a_k."""
    return (noise.double() / noise_scale(sigmas)).to(noise.dtype)


def update_levels(levels: torch.Tensor, gains: torch.Tensor, eps1, eps2: float,
                  scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """levels (T,), gains (N, T) -> new levels. Balanced signs -> more noise; one sign dominating -> less.
    scale (T,) f_k: the step eps2 is in noise units (s_k moves by eps2, a_k by eps2 / f_k); None: in level units."""
    imbalance = ((gains > 0).sum(0) - (gains < 0).sum(0)).abs().double()
    balanced = imbalance < balance_threshold(gains, eps1).to(imbalance.device)
    step = torch.where(balanced.to(levels.device), torch.full_like(levels, eps2), torch.full_like(levels, -eps2))
    if scale is not None:
        step = step / scale.to(step.device, step.dtype)
    return (levels + step).clamp(min=0.0)


def calibrate(cfg, out: str, rounds: int = 5, n: int = 32, eps1="auto", eps2: float = 0.01,
              device: Optional[str] = None, units: str = "level") -> dict:
    """device None: CUDA when available, else the CPU. Decodes are chunked (model.decode_batch). units: eps2 moves
    a_k ("level") or s_k ("noise", the paper's Algorithm 1)."""
    if units not in ("level", "noise"):
        raise ValueError(f"calibrate: units must be 'level' or 'noise', got {units!r}")
    from ..rollout.completions import dense_rollout
    from ..rollout.setup import build_sampling
    from .dense import step_gains
    from ..utils import seeding

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sc = cfg.sampling
    # the uniform levels of sampling.noise_level are the start (not a calibrated file); rounds + 1 passes to compile for
    setup = build_sampling(cfg, device, os.path.join(out, "model"), compile_epochs=rounds + 1, calibrated=False)
    prompts, models, reward, sched, velocity = setup.prompts, setup.models, setup.reward, setup.sched, setup.velocity
    levels = sched.noise_levels.clone()
    g = torch.Generator().manual_seed(cfg.run.seed)
    history = []
    for r in range(rounds + 1):
        gains = []
        for s in range(0, n, sc.sample_batch):
            b = min(sc.sample_batch, n - s)
            ps = [prompts[i] for i in torch.randint(len(prompts), (b,), generator=g).tolist()]
            cond = models.text.conditioning(ps)
            keys = [(cfg.run.seed, r, s + i) for i in range(b)]
            z0 = seeding.RowNoise(device, [k + (seeding.TAG_INITIAL_NOISE,) for k in keys]).randn(models.latent_shape)
            dr = dense_rollout(velocity, cond, z0, sched.sigmas, levels,
                               seeding.RowNoise(device, [k + (seeding.TAG_SDE_NOISE,) for k in keys]), None,
                               sc.variant, sc.logprob_reduction, sc.cps_logprob, cfg.credit.max_completion_batch)
            finals = torch.cat([dr.completions, dr.trajectory.latents[:, -1:]], 1)
            q, _ = reward(models.decode(finals.flatten(0, 1)), [x for x in ps for _ in range(sc.steps + 1)])
            gains.append(step_gains(q.view(b, -1).double()))
        gains = torch.cat(gains)
        history.append({"round": r, "noise_levels": levels.tolist(), "pos_frac": (gains > 0).float().mean(0).tolist(),
                        "neg_frac": (gains < 0).float().mean(0).tolist(), "gain_mean": gains.mean(0).tolist()})
        print(f"round {r}: levels {[round(x, 3) for x in levels.tolist()]} "
              f"pos_frac {[round(x, 2) for x in history[-1]['pos_frac']]}", flush=True)
        if r < rounds:
            levels = update_levels(levels, gains, eps1, eps2,
                                   noise_scale(sched.sigmas) if units == "noise" else None)
    result = {"noise_levels": history[-1]["noise_levels"], "history": history, "eps1": eps1, "eps2": eps2, "n": n,
              "rounds": rounds, "steps": sc.steps, "initial_level": sc.noise_level, "units": units,
              "noise": (levels.double().cpu() * noise_scale(sched.sigmas.cpu())).tolist()}
    os.makedirs(out, exist_ok=True)
    atomic_write_json(os.path.join(out, "noise_schedule.json"), result)
    plot_calibration(result, os.path.join(out, "calibration.png"))
    return result


def plot_calibration(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h0, h1 = result["history"][0], result["history"][-1]
    k = list(range(len(h0["noise_levels"])))
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(k, h0["noise_levels"], "o-", label="before")
    ax[0].plot(k, h1["noise_levels"], "s-", label="after")
    ax[0].set(xlabel="step k", ylabel="noise level a_k (psi)", title="exploration level per step")
    ax[1].plot(k, h0["pos_frac"], "o-", label="before")
    ax[1].plot(k, h1["pos_frac"], "s-", label="after")
    ax[1].axhline(0.5, color="gray", lw=0.5)
    ax[1].set(xlabel="step k", ylabel="fraction of gains > 0", title="dense reward sign balance")
    for a in ax:
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
