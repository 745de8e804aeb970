"""TempFlow-GRPO: trajectory branching with seed groups, on the shared samplers.

Per prompt, S = group_size / K seeds. For each seed the main path is the ODE from z_0; at each branch step k
(credit.branch_steps) K one-step SDE samples z_{k+1}^b are drawn from the ODE state z_k (they share its velocity),
each is ODE-completed to an image and scored: that reward is the reward of step k's action (all randomness of the
branch sits at step k). Rows: one per (prompt, seed, k, b), ordered that way; advantages are normalised per
(prompt, seed, k) over the K branches. Only step k of a row is trained.
"""
from __future__ import annotations

import torch

from ..rollout.driver import RolloutResult, score
from ..utils import seeding
from .advantages import group_advantages


class BranchSampler:
    """Samples TempFlow-GRPO's rows: ODE main paths and one-step SDE branches, each branch completed and scored.
    Its rows are laid out per (prompt, seed, branch step, branch), so it runs its own loop over the rollout
    context instead of the common batch driver; its completed branches are decoded and scored through the driver's
    one path (rollout.driver.score: in the reward thread)."""

    def __init__(self, cfg, sched):
        self.cfg, self.sched = cfg, sched
        self.K = cfg.credit.branches
        self.steps = [int(k) for k in cfg.credit.branch_steps]
        if cfg.train.group_size % self.K:
            raise ValueError(f"train.group_size={cfg.train.group_size} must be a multiple of credit.branches={self.K}"
                             " (group = seeds x branches)")
        self.seeds = cfg.train.group_size // self.K

    def rows_per_prompt(self, g: int) -> int:
        return self.seeds * len(self.steps) * self.K

    def group_size(self, g: int) -> int:
        """Advantages are normalised over the K branches of one (prompt, seed, step)."""
        return self.K

    def rollout(self, ctx, local_ids: torch.Tensor, epoch: int) -> RolloutResult:
        from .. import ops
        from ..rollout.sampler import ode_sample
        cfg, sc, dev = self.cfg, self.cfg.sampling, ctx.device
        velocity = ctx.velocity
        sig, levels = self.sched.sigmas, self.sched.noise_levels
        T, K, nk = self.sched.steps, self.K, len(self.steps)
        n = local_ids.numel()
        first = ctx.rank * n                                  # global index of this rank's first row
        rows = first + torch.arange(n)
        rpp = self.rows_per_prompt(cfg.train.group_size)
        inst, within = rows // rpp, rows % rpp                # prompt instance, index inside it
        seed_of, k_of = within // (nk * K), (within // K) % nk
        prompts = [ctx.prompts[i] for i in local_ids.tolist()]
        shape = ctx.models.latent_shape
        lat = torch.zeros(n, T + 1, *shape)
        lps = torch.zeros(n, T)
        mask = torch.zeros(n, T, dtype=torch.bool)
        # ---- ODE main paths, one per (prompt instance, seed) present on this rank; velocities kept
        paths = sorted(set(zip(inst.tolist(), seed_of.tolist())))
        first_row = {}
        for r, key in enumerate(zip(inst.tolist(), seed_of.tolist())):
            first_row.setdefault(key, r)
        zs, vs = {}, {}
        B = sc.sample_batch
        for s in range(0, len(paths), B):
            chunk = paths[s:s + B]
            cond = ctx.conditioning([prompts[first_row[key]] for key in chunk])
            z0 = ctx.noise(epoch, chunk, seeding.TAG_INITIAL_NOISE, "cpu").randn(shape).to(dev)
            z = z0
            traj_z, traj_v = [z], []
            for k in range(max(self.steps) + 1):
                kk = torch.full((len(chunk),), k, dtype=torch.long, device=dev)
                v = velocity(z, sig[kk], cond)
                traj_v.append(v)
                z = z + v * (sig[k + 1] - sig[k])
                traj_z.append(z)
            for j, key in enumerate(chunk):
                zs[key] = [t[j] for t in traj_z]
                vs[key] = [t[j] for t in traj_v]
        # ---- branches: one SDE step from z_k with the path's velocity, then the ODE to sigma = 0, batched per k
        futures, decodes, extra = [], 0, 0
        for k in self.steps:
            idx = (k_of == self.steps.index(k)).nonzero().flatten().tolist()
            for s in range(0, len(idx), B * K):
                part = idx[s:s + B * K]
                keys = [(inst[r].item(), seed_of[r].item()) for r in part]
                zk = torch.stack([zs[key][k] for key in keys])
                vk = torch.stack([vs[key][k] for key in keys])
                rows_g = [first + r for r in part]
                eps = ctx.noise(epoch, rows_g, seeding.TAG_BRANCH_NOISE, "cpu").randn(shape).to(dev)
                kk = torch.full((len(part),), k, dtype=torch.long, device=dev)
                z1, lp = ops.sde_step(zk, vk, sig, levels, kk, eps, sc.variant, sc.logprob_reduction, sc.cps_logprob)
                cond = ctx.conditioning([prompts[r] for r in part])
                before = velocity.nfe
                x0 = ode_sample(velocity, cond, z1, sig, start=k + 1)
                extra += velocity.nfe - before
                decodes += len(part)
                futures.append((part, score(ctx, x0[:, None], [prompts[r] for r in part])))
                lat[part, k], lat[part, k + 1] = zk.cpu(), z1.cpu()
                lps[part, k] = lp.cpu()
                mask[part, k] = True
        # rewards come back per chunk: reorder them into row order
        order = [r for part, _ in futures for r in part]
        # the K branches of (prompt instance, seed, k) leave the same z_k: one state per main path (and step)
        state_rows = torch.tensor([first_row[key] for key in zip(inst.tolist(), seed_of.tolist())], dtype=torch.long)
        return RolloutResult(lat, lps, levels, mask, [f for _, f in futures], 1, extra, decodes, torch.tensor(order),
                             state_rows)


class BranchAdvantages:
    """Per (prompt, seed, branch step) over the K branches; only the branch step of a row carries it."""

    def __init__(self, sampler: BranchSampler):
        self.s = sampler

    def __call__(self, scores: torch.Tensor, group_ids: torch.Tensor, tc) -> tuple[torch.Tensor, dict]:
        s = self.s
        a = group_advantages(scores[:, -1], group_ids, "group", tc.adv_clip)
        A = torch.zeros(a.shape[0], s.sched.steps)
        rpp = s.rows_per_prompt(s.cfg.train.group_size)
        k_of = (torch.arange(a.shape[0]) % rpp // s.K) % len(s.steps)
        A[torch.arange(a.shape[0]), torch.tensor(s.steps)[k_of]] = a
        return A, {"adv_abs_mean": a.abs().mean().item(), "adv_zero_frac": (a == 0).float().mean().item()}
