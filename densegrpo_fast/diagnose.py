"""`densegrpo diagnose`: does dense (step-wise) credit have a signal to work with, for this model, reward and schedule?

Samples N trajectories (N / G prompts of the train split, G = train.group_size trajectories each) with the config's
SDE rollout and the ODE completion of every z_k (credit.completion_steps), scores Q_0..Q_T with the config's reward,
and reports (docs/diagnose.md reads them):

  distinct Q values      how many different values Q_k takes (a verifier's partial credit has a handful)
  zero-gain fraction     P(g_k = 0) per step, g_k = Q_{k+1} - Q_k: a step whose gain is exactly 0 carries no signal of
                         its own; per-step normalisation still gives it an advantage from the others' gains
  lag-1 correlation      corr(g_k, g_{k+1}) over trajectories and steps, and the sign-reversal rate of consecutive
                         non-zero gains: strongly negative = the gains are noise in Q_k that cancels along the path
  variance ratio         sum_k Var(g_k) / Var(Q_T - Q_0) (within a group, prompt means removed): 1 when the step
                         gains are uncorrelated; r > 1 means a fraction 1 - 1/r of the step signal cancels
  perturbation           Q_k recomputed from z_k + d eps, d = `perturb` x the SDE step's std at k (a small move) and
                         d = the step's std (what the SDE step itself moves): the rate at which Q_k changes (by more
                         than 1e-6) under each, and the sensitivity (E|dQ_small| / perturb) / E|dQ_step| (about 1 for
                         a Q_k that is smooth in z_k at the scale of one step, >> 1 for a Q_k that jumps)
  corr(Q_k, Q_T)         per step, within groups: how well the completion's value predicts the final reward
  dense vs sparse        the sign agreement (entries where both are non-zero) and correlation of DenseGRPO's per-step
                         advantages with Flow-GRPO's (the final reward's group advantage at every step), per step, and
                         the fraction of non-zero dense advantages that sit on a step whose own gain is 0

The statistics are plain functions of tensors (tested on hand-made cases in tests/test_diagnose.py); `diagnose`
does the sampling.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import torch

TOL = 1e-6


# ------------------------------------------------------------------------------------------ statistics

def group_centred(x: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """x (N, ...) minus its group's mean (rows with equal group_ids)."""
    x = x.double()
    out = torch.empty_like(x)
    for g in torch.unique(group_ids):
        m = group_ids == g
        out[m] = x[m] - x[m].mean(0, keepdim=True)
    return out


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = (a.pow(2).sum() * b.pow(2).sum()).sqrt()
    return float((a * b).sum() / den) if den > 0 else float("nan")


def distinct_values(q: torch.Tensor, tol: float = TOL) -> dict:
    """q (N, T+1) -> distinct values overall and per step (values closer than tol count as one)."""
    def n(x):
        v = torch.sort(x.double().flatten()).values
        return int(1 + (v.diff() > tol).sum()) if v.numel() else 0
    return {"overall": n(q), "per_step": [n(q[:, k]) for k in range(q.shape[1])], "of": int(q.numel())}


def zero_gain_fraction(g: torch.Tensor, tol: float = TOL) -> list[float]:
    """g (N, T) -> P(|g_k| <= tol) per step."""
    return (g.abs() <= tol).double().mean(0).tolist()


def lag1(g: torch.Tensor, tol: float = TOL) -> dict:
    """g (N, T) -> corr(g_k, g_{k+1}) over all (trajectory, k) pairs, and the fraction of consecutive pairs of
    non-zero gains whose signs differ."""
    a, b = g[:, :-1], g[:, 1:]
    nz = (a.abs() > tol) & (b.abs() > tol)
    rev = ((a * b) < 0) & nz
    return {"corr": _pearson(a, b), "reversal_rate": float(rev.sum() / nz.sum()) if nz.any() else float("nan"),
            "nonzero_pairs": int(nz.sum())}


def variance_ratio(q: torch.Tensor, group_ids: torch.Tensor) -> dict:
    """sum_k Var(g_k) / Var(Q_T - Q_0), variances of group-centred values (population, over all rows); and each
    step's share Var(g_k) / Var(Q_T - Q_0)."""
    g = group_centred(q[:, 1:] - q[:, :-1], group_ids)
    tot = group_centred(q[:, -1] - q[:, 0], group_ids)
    vt = tot.pow(2).mean()
    per = g.pow(2).mean(0)
    ratio = float(per.sum() / vt) if vt > 0 else float("nan")
    return {"ratio": ratio, "per_step": (per / vt).tolist() if vt > 0 else [float("nan")] * g.shape[1],
            "cancelled": 1 - 1 / ratio if ratio == ratio and ratio > 0 else float("nan")}


def corr_with_final(q: torch.Tensor, group_ids: torch.Tensor) -> list[float]:
    """q (N, T+1) -> corr(Q_k, Q_T) per k over group-centred values (nan where Q_k does not vary in any group)."""
    c = group_centred(q, group_ids)
    return [_pearson(c[:, k], c[:, -1]) for k in range(q.shape[1])]


def perturbation_stats(q: torch.Tensor, q_small: torch.Tensor, q_step: torch.Tensor, perturb: float,
                       tol: float = TOL) -> dict:
    """q, q_small, q_step (N, T): Q_k from z_k, from z_k + perturb * std_k * eps and from z_k + std_k * eps.
    -> per step the change rates and the sensitivity (E|dQ_small| / perturb) / E|dQ_step| (nan where the step's
    perturbation moves nothing)."""
    ds, dl = (q_small - q).abs().double(), (q_step - q).abs().double()
    sens = [float(ds[:, k].mean() / perturb / dl[:, k].mean()) if dl[:, k].mean() > 0 else float("nan")
            for k in range(q.shape[1])]
    pooled = float(ds.mean() / perturb / dl.mean()) if dl.mean() > 0 else float("nan")
    return {"flip_small": (ds > tol).double().mean(0).tolist(), "flip_step": (dl > tol).double().mean(0).tolist(),
            "sensitivity": sens, "sensitivity_pooled": pooled, "perturb": perturb,
            "flip_small_mean": float((ds > tol).double().mean()), "flip_step_mean": float((dl > tol).double().mean())}


def advantage_agreement(dense: torch.Tensor, sparse: torch.Tensor, gains: Optional[torch.Tensor] = None,
                        tol: float = TOL) -> dict:
    """dense, sparse (N, T) advantages -> sign agreement where both are non-zero (overall, per step), Pearson
    correlation (overall, per step), and (given gains) the fraction of non-zero dense advantages on zero-gain steps."""
    both = (dense.abs() > tol) & (sparse.abs() > tol)
    agree = (torch.sign(dense) == torch.sign(sparse)) & both
    per_agree = [float(agree[:, k].sum() / both[:, k].sum()) if both[:, k].any() else float("nan")
                 for k in range(dense.shape[1])]
    out = {"sign_agreement": float(agree.sum() / both.sum()) if both.any() else float("nan"),
           "sign_agreement_per_step": per_agree, "corr": _pearson(dense, sparse),
           "corr_per_step": [_pearson(dense[:, k], sparse[:, k]) for k in range(dense.shape[1])]}
    if gains is not None:
        nz = dense.abs() > tol
        out["nonzero_adv_on_zero_gain"] = float((nz & (gains.abs() <= tol)).sum() / nz.sum()) if nz.any() \
            else float("nan")
    return out


def credit_signal(q: torch.Tensor, group_ids: torch.Tensor, adv_std: str = "global", clip: float = 5.0,
                  zero_gain: str = "normalise", perturbed: Optional[tuple] = None) -> dict:
    """Every statistic of a (N, T+1) table of Q_0..Q_T; perturbed = (q_small, q_step, perturb) adds the
    perturbation statistics."""
    from .credit.advantages import group_advantages, per_timestep_advantages
    q = q.double()
    g = q[:, 1:] - q[:, :-1]
    dense = per_timestep_advantages(g, group_ids, clip).double()
    if zero_gain == "zero":
        dense = torch.where(g == 0, torch.zeros_like(dense), dense)
    sparse = group_advantages(q[:, -1], group_ids, adv_std, clip).double()[:, None].expand_as(g)
    out = {"n": int(q.shape[0]), "steps": int(g.shape[1]), "groups": int(torch.unique(group_ids).numel()),
           "distinct": distinct_values(q), "zero_gain": zero_gain_fraction(g), "lag1": lag1(g),
           "variance": variance_ratio(q, group_ids), "corr_q_final": corr_with_final(q, group_ids),
           "agreement": advantage_agreement(dense, sparse, g),
           "q_mean": q.mean(0).tolist(), "q_std": q.std(0).tolist()}
    out["zero_gain_mean"] = float(sum(out["zero_gain"]) / len(out["zero_gain"]))
    if perturbed is not None:
        out["perturbation"] = perturbation_stats(q[:, :-1], perturbed[0].double(), perturbed[1].double(),
                                                 perturbed[2])
    return out


# ------------------------------------------------------------------------------------------ reading

def _f(x, d=3):
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def reading(s: dict) -> list[tuple[str, str, str]]:
    """(statistic, value, what it means here) rows."""
    d, lg, v, ag = s["distinct"], s["lag1"], s["variance"], s["agreement"]
    rows = []
    disc = d["overall"] < 0.5 * d["of"]
    rows.append(("distinct values of Q_k", f"{d['overall']} of {d['of']}",
                 "discrete: gains are often exactly 0 and jump by whole sub-conditions" if disc
                 else "continuous: almost every completion scores differently"))
    z = s["zero_gain_mean"]
    rows.append(("zero-gain fraction (mean over steps)", _f(z),
                 "many steps carry no signal of their own; normalised per step, their advantages come from the "
                 "few trajectories that moved" if z > 0.2 else "almost every step's gain carries a signal"))
    rows.append(("lag-1 correlation of gains", _f(lg["corr"]),
                 "consecutive gains reverse: step credit is largely noise in Q_k that cancels" if lg["corr"] < -0.2
                 else "consecutive gains are close to independent" if abs(lg["corr"]) <= 0.2
                 else "consecutive gains move together (slow drift)"))
    rows.append(("sign reversals of consecutive non-zero gains", _f(lg["reversal_rate"]),
                 "chance level is about 0.5"))
    rows.append(("sum_k Var(g_k) / Var(Q_T - Q_0)", _f(v["ratio"], 2),
                 f"{100 * v['cancelled']:.0f} % of the per-step variance cancels along the trajectory"
                 if v["ratio"] == v["ratio"] and v["ratio"] > 1.2 else
                 "the step gains reinforce each other" if v["ratio"] == v["ratio"] and v["ratio"] < 0.8
                 else "the step gains add up with little cancelling"))
    if "perturbation" in s:
        p = s["perturbation"]
        rows.append((f"Q_k changes under a perturbation {p['perturb']:g} x the SDE step's", _f(p["flip_small_mean"]),
                     f"against {_f(p['flip_step_mean'])} under the step's own noise"))
        sens = p["sensitivity_pooled"]
        rows.append(("sensitivity (small / step, per unit size)", _f(sens, 1),
                     "Q_k jumps: a tiny move of z_k changes it about as much as a whole SDE step" if sens > 5
                     else "Q_k is smooth in z_k at the scale of one step"))
    c = s["corr_q_final"]
    early = c[0]
    rows.append(("corr(Q_k, Q_T) at k = 0 / T/2 / T-1", f"{_f(c[0], 2)} / {_f(c[len(c) // 2], 2)} / {_f(c[-2], 2)}",
                 "Q_0 does not vary within a group" if early != early else
                 "early completions say little about the final reward: early step credit is unreliable"
                 if early < 0.5 else "completions predict the final reward from the start"))
    rows.append(("sign agreement of dense and sparse advantages", _f(ag["sign_agreement"]),
                 "about chance: dense credit points elsewhere than the final reward" if ag["sign_agreement"] < 0.6
                 else "dense credit mostly agrees in sign with the final reward's"))
    rows.append(("correlation of dense and sparse advantages", _f(ag["corr"]), ""))
    rows.append(("non-zero dense advantages on zero-gain steps", _f(ag["nonzero_adv_on_zero_gain"]),
                 "advantage given to steps that changed nothing" if ag["nonzero_adv_on_zero_gain"] > 0.2 else ""))
    return rows


def markdown(s: dict, title: str = "") -> str:
    lines = [f"**{title}**", ""] if title else []
    lines += ["| statistic | value | reading |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in reading(s)]
    lines += ["", "| step k | distinct Q_k | P(g_k = 0) | Var(g_k) / Var(Q_T-Q_0) | corr(Q_k, Q_T) | "
              "Q_k changes: small / step | sign agreement dense-sparse |", "|---|---|---|---|---|---|---|"]
    p = s.get("perturbation")
    for k in range(s["steps"]):
        fl = f"{_f(p['flip_small'][k], 2)} / {_f(p['flip_step'][k], 2)}" if p else "-"
        lines.append(f"| {k} | {s['distinct']['per_step'][k]} | {_f(s['zero_gain'][k], 2)} | "
                     f"{_f(s['variance']['per_step'][k], 2)} | {_f(s['corr_q_final'][k], 2)} | {fl} | "
                     f"{_f(s['agreement']['sign_agreement_per_step'][k], 2)} |")
    return "\n".join(lines) + "\n"


def plot(s: dict, path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    T = s["steps"]
    k = list(range(T))
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.4))
    ax[0].plot(k, s["zero_gain"], "o-")
    ax[0].set(xlabel="step k", ylabel="P(g_k = 0)", title="zero gains", ylim=(-0.02, 1.02))
    ax[1].plot(list(range(T + 1)), s["corr_q_final"], "o-")
    lo = min([-0.1] + [c - 0.05 for c in s["corr_q_final"] if c == c])
    ax[1].set(xlabel="step k", ylabel="corr(Q_k, Q_T)", title="completion value vs final reward", ylim=(lo, 1.02))
    if "perturbation" in s:
        p = s["perturbation"]
        ax[2].plot(k, p["flip_small"], "o-", label=f"{p['perturb']:g} x step std")
        ax[2].plot(k, p["flip_step"], "s-", label="step std")
        ax[2].legend(fontsize=8)
    ax[2].set(xlabel="step k", ylabel="P(Q_k changes)", title="Q_k under a perturbation of z_k", ylim=(-0.02, 1.02))
    ax[3].plot(k, s["variance"]["per_step"], "o-", label="Var(g_k) / Var(Q_T - Q_0)")
    ax[3].plot(k, s["agreement"]["sign_agreement_per_step"], "s-", label="sign agreement dense-sparse")
    ax[3].axhline(0.5, color="gray", lw=0.5)
    ax[3].set(xlabel="step k", title="step variance, agreement")
    ax[3].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ sampling

@torch.no_grad()
def completion_values(velocity, cond, starts_latents: torch.Tensor, sigmas: torch.Tensor, k: int,
                      completion_steps: Optional[int]) -> torch.Tensor:
    """ODE completion of (B, C, h, w) latents at step k over the completion schedule -> x0 latents."""
    from .rollout.completions import completion_schedule
    x = starts_latents
    B = x.shape[0]
    idx = completion_schedule(sigmas, k, completion_steps)
    for a, b in zip(idx[:-1], idx[1:]):
        v = velocity(x, sigmas[a].expand(B), cond)
        x = x + v.to(x.dtype) * (sigmas[b] - sigmas[a])
    return x


@torch.no_grad()
def diagnose(cfg, n: int = 32, group: Optional[int] = None, out: Optional[str] = None, perturb: float = 0.01,
             seed: int = 0, device: Optional[str] = None, perturbation: bool = True) -> dict:
    """Sample n trajectories (n / group prompts of the train split) and return credit_signal's statistics."""
    from .ops.reference import step_coefficients
    from .rollout.completions import dense_rollout
    from .rollout.setup import build_sampling
    from .utils import seeding

    t0 = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sc, G = cfg.sampling, group or cfg.train.group_size
    n_prompts = max(1, n // G)
    n = n_prompts * G
    setup = build_sampling(cfg, device, os.path.join(out or "/tmp/densegrpo_diagnose", "model"))  # eager
    prompts_all, models, reward = setup.prompts, setup.models, setup.reward
    sched, velocity = setup.sched, setup.velocity
    T = sc.steps
    cs = cfg.credit.completion_steps
    cs = None if cs == "remaining" else int(cs)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(prompts_all), generator=g)[:n_prompts].tolist()
    prompts = [prompts_all[i] for i in pick for _ in range(G)]
    group_ids = torch.arange(n_prompts).repeat_interleave(G)
    std = step_coefficients(sched.sigmas, sched.noise_levels, torch.arange(T, device=device), 1, sc.variant).std
    qs, qsm, qst = [], [], []

    def score(latents, ps):
        r, _ = reward(models.decode(latents), ps)
        return r.double()

    for s in range(0, n, sc.sample_batch):
        ps = prompts[s:s + sc.sample_batch]
        b = len(ps)
        cond = models.text.conditioning(ps)
        keys = [(seed, 0, s + i) for i in range(b)]
        z0 = seeding.RowNoise(device, [k + (seeding.TAG_INITIAL_NOISE,) for k in keys]).randn(models.latent_shape)
        dr = dense_rollout(velocity, cond, z0, sched.sigmas, sched.noise_levels,
                           seeding.RowNoise(device, [k + (seeding.TAG_SDE_NOISE,) for k in keys]), cs, sc.variant,
                           sc.logprob_reduction, sc.cps_logprob, cfg.credit.max_completion_batch)
        finals = torch.cat([dr.completions, dr.trajectory.latents[:, -1:]], 1)     # (b, T+1, ...)
        qs.append(score(finals.flatten(0, 1), [x for x in ps for _ in range(T + 1)]).view(b, T + 1))
        if perturbation:
            pn = seeding.RowNoise(device, [k + (seeding.TAG_BRANCH_NOISE,) for k in keys])
            small, step = [], []
            for k in range(T):
                eps = pn.randn(models.latent_shape)
                zk = dr.trajectory.latents[:, k]
                xs = [completion_values(velocity, cond, zk + f * std[k] * eps, sched.sigmas, k, cs)
                      for f in (perturb, 1.0)]
                small.append(xs[0])
                step.append(xs[1])
            qsm.append(score(torch.stack(small, 1).flatten(0, 1), [x for x in ps for _ in range(T)]).view(b, T))
            qst.append(score(torch.stack(step, 1).flatten(0, 1), [x for x in ps for _ in range(T)]).view(b, T))
        print(f"diagnose: {min(s + b, n)}/{n} trajectories ({time.perf_counter() - t0:.0f}s)", flush=True)
    reward.close()
    q = torch.cat(qs)
    pert = (torch.cat(qsm), torch.cat(qst), perturb) if perturbation else None
    res = credit_signal(q, group_ids, cfg.train.adv_std, cfg.train.adv_clip, cfg.credit.zero_gain, pert)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["settings"] = {"n": n, "group": G, "prompts": n_prompts, "steps": T, "noise_level": sc.noise_level,
                       "noise_schedule_file": sc.noise_schedule_file, "completion_steps": cfg.credit.completion_steps,
                       "reward": cfg.reward.components or cfg.reward.weights, "seed": seed, "perturb": perturb,
                       "device": str(device)}
    res["q"] = q.tolist()
    return res


def diagnose_main(argv) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="densegrpo diagnose",
                                description="the signal dense credit would get from this config's model, reward and "
                                            "schedule (docs/diagnose.md)")
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--n", type=int, default=32, help="trajectories (n / group prompts)")
    p.add_argument("--group", type=int, default=None, help="trajectories per prompt (default train.group_size)")
    p.add_argument("--perturb", type=float, default=0.01, help="small perturbation, in units of the step's std")
    p.add_argument("--no-perturbation", action="store_true", help="skip the perturbation completions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for diagnose.json, diagnose.md, diagnose.png")
    a = p.parse_args(argv)
    from .utils.cli_helpers import _quiet, load_config_or_none
    _quiet()
    cfg = load_config_or_none(a.config, a.overrides)
    if cfg is None:
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    res = diagnose(cfg, a.n, a.group, a.out, a.perturb, a.seed, perturbation=not a.no_perturbation)
    title = (f"{a.config} (N = {res['n']}, {res['groups']} prompts x {res['n'] // res['groups']}, "
             f"{res['seconds']:.0f} s)")
    md = markdown(res, title)
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "diagnose.json"), "w") as f:
            json.dump(res, f)
        with open(os.path.join(a.out, "diagnose.md"), "w") as f:
            f.write(md)
        plot(res, os.path.join(a.out, "diagnose.png"), title)
        print(f"wrote {a.out}/diagnose.json, diagnose.md, diagnose.png")
    return 0
