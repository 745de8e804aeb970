"""The GRPO training loop, top to bottom: prompts -> rollout -> rewards -> credit -> update -> log/save.

Each stage lives in its own module: set-up rollout/setup.py, rollout credit/ + rollout/driver.py (decodes and rewards
in the reward threads), credit credit/, update train/objective.py (+ DeepSpeed here), evaluation eval/, checkpoints
train/checkpoint.py, collectives train/distributed.py.

Launch:
    python train.py --config configs/tiny_jpeg.yaml                 # one process
    deepspeed --num_gpus 2 train.py --config configs/tiny_jpeg.yaml  # ZeRO, gloo on CPU / nccl on GPU
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
from tqdm.auto import tqdm

from .. import ops
from ..config import Config, save_config
from ..eval import EvalContext, base_evaluation, evaluate_prompts
from ..credit import make_credit
from ..models.base import compile_transformer, resolve_compile
from ..models.lora import adapter_disabled, add_lora, lora_metadata, lora_state_dict
from ..prompts import load_prompts, vocabulary
from ..utils.provenance import write_run_info
from ..rollout.context import RolloutContext
from ..rollout.sampler import GuidedVelocity
from ..rollout import setup
from ..utils import faults, seeding
from ..utils.io import atomic_write_text, read_jsonl
from . import checkpoint as ckpt
from . import objective
from .objective import distinct_states
from .distributed import (agree_any, agree_max, all_gather_cat, all_reduce_max, all_reduce_sum, all_reduce_sum_int,
                          barrier, check_shared_filesystem, init_distributed, raise_if_any_failed)


class NonFiniteLossError(FloatingPointError):
    pass


def gathered(params, zero3: bool, modify: bool = False):
    """Full parameters inside the block: under ZeRO-3 they are partitioned and must be gathered (and, when the block
    writes them, scattered back from rank 0); a no-op otherwise."""
    if not zero3:
        return nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0 if modify else None)


_ZERO3_FETCHES = [0]  # ZeRO-3 per-module parameter fetches in this process (instrumented below)


def _count_zero3_fetches() -> None:
    """Count DeepSpeed ZeRO-3's per-module parameter fetches (each one all-gathers a module's weights), so the
    metrics can show that the rollout makes none (it gathers once: Trainer.inference_weights)."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as PPC
    orig = PPC.fetch_sub_module
    if getattr(orig, "_densegrpo_counted", False):
        return

    def fetch_sub_module(self, *args, **kwargs):
        _ZERO3_FETCHES[0] += 1
        return orig(self, *args, **kwargs)

    fetch_sub_module._densegrpo_counted = True
    PPC.fetch_sub_module = fetch_sub_module


class EMA:
    """Exponential moving average of the trainable (LoRA) weights, fp32, for evaluation."""

    def __init__(self, params, decay: float, zero3: bool = False):
        self.params = list(params)
        self.decay = decay
        self.zero3 = zero3
        with gathered(self.params, zero3):
            self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        with gathered(self.params, self.zero3):
            for s, p in zip(self.shadow, self.params):
                s.mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @contextmanager
    def swapped(self, shadow=None):
        """The EMA weights (or another snapshot of them, `shadow`) in the model inside the block."""
        with gathered(self.params, self.zero3, modify=True):
            saved = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for s, p in zip(shadow if shadow is not None else self.shadow, self.params):
                    p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with gathered(self.params, self.zero3, modify=True), torch.no_grad():
                for b, p in zip(saved, self.params):
                    p.copy_(b)


class Trainer:
    train_forwards = 0  # network evaluations of the training phase (CFG counts 2), counted by its velocities

    def __init__(self, cfg: Config, run_dir: str, resume: bool = False):
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.rank, self.world, self.device = init_distributed(cfg.run.collective_timeout_s)
        self.main = self.rank == 0
        ops.set_backend(cfg.ops.backend)
        torch.manual_seed(cfg.run.seed)
        if self.main:
            os.makedirs(run_dir, exist_ok=True)
            save_config(cfg, os.path.join(run_dir, "config.yaml"))
            write_run_info(run_dir)  # commit, package versions, machine, command line
        barrier()
        check_shared_filesystem(run_dir, self.rank, self.device)  # multi-node: one filesystem for every rank

        # ---------------------------------------------------------------- prompts, model, LoRA, text cache
        self.train_prompts = load_prompts(cfg.prompts, "train")
        self.eval_prompts = load_prompts(cfg.prompts, cfg.eval.split) if cfg.eval.enabled else []
        held_out = cfg.prompts.source == "shapes" and cfg.eval.split != "train"  # list/file sources have one split
        if cfg.eval.enabled and held_out and set(self.eval_prompts) & set(self.train_prompts):
            raise ValueError(f"prompts: the {cfg.eval.split} split shares prompts with the train split")
        words = vocabulary(self.train_prompts + self.eval_prompts)
        model_dir = os.path.join(run_dir, "model") if cfg.model.path is None else None
        if self.main and model_dir is not None:
            setup.load_models(cfg, "cpu", words, model_dir)  # writes the folder
        barrier()
        self.models = setup.load_models(cfg, self.device, words, model_dir)
        self.trainable = add_lora(self.models.transformer, cfg.model.lora, self.models.family, seed=cfg.run.seed)
        self.compile_mode, why = resolve_compile(cfg.model.compile, self.models.transformer, cfg.run.epochs,
                                                 cfg.run.wall_clock_budget_s, cfg.train.zero_stage,
                                                 lambda cold: agree_any(cold, self.device))
        if cfg.model.compile == "auto" and self.main:
            print(f"model.compile=auto: {self.compile_mode} ({why})", flush=True)
        compile_transformer(self.models.transformer, self.compile_mode)  # after LoRA: the adapters are compiled in

        # ---------------------------------------------------------------- schedules (rollout/setup.py)
        self.sched = setup.rollout_schedule(cfg, self.models, self.device)  # calibrated levels when a file is set
        self.eval_sched = setup.eval_schedule(cfg, self.models, self.device)  # Euler ODE
        self.n_train_steps = max(1, int(math.floor(cfg.train.timestep_fraction * cfg.sampling.steps)))
        self.credit = make_credit(cfg, self.sched)

        # ---------------------------------------------------------------- epoch geometry
        self.rows_per_prompt = self.credit.rows_per_prompt(cfg.train.group_size)
        self.n_global = cfg.train.prompts_per_epoch * self.rows_per_prompt
        if self.n_global % self.world:
            raise ValueError(f"train.prompts_per_epoch x rows per prompt = {self.n_global} trajectories is not "
                             f"divisible by the world size {self.world}")
        self.n_local = self.n_global // self.world

        # ---------------------------------------------------------------- DeepSpeed engine
        import deepspeed
        tc = cfg.train
        optimizer = torch.optim.AdamW(self.trainable, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        ds_config = {
            "train_micro_batch_size_per_gpu": tc.micro_batch,
            "gradient_accumulation_steps": 1,  # the boundary is set by hand: see _train
            "gradient_clipping": tc.grad_clip,
            "zero_optimization": {"stage": tc.zero_stage, "overlap_comm": False, "contiguous_gradients": False},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
            "fp16": {"enabled": cfg.model.dtype == "float16"},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(model=self.models.transformer, optimizer=optimizer,
                                                    model_parameters=self.trainable, config=ds_config)
        self.zero3 = tc.zero_stage == 3
        self.zero3_gathers = 0
        if self.zero3:
            _count_zero3_fetches()
        self.ema = EMA(self.trainable, tc.ema_decay, self.zero3)
        # One graphed velocity for all rollouts: graphs are captured once per staircase shape and replay the live
        # LoRA weights (updated in place). ZeRO-3 gathers parameters into fresh buffers, so no graphs there.
        from ..rollout.graphs import GraphedVelocity
        self.rollout_velocity = GraphedVelocity(GuidedVelocity(self.engine.module, cfg.sampling.guidance,
                                                               family=self.models.family),
                                                enabled=cfg.sampling.cuda_graphs and tc.zero_stage < 3
                                                and self.compile_mode in ("off", "default"))
        self.reward = setup.build_reward(cfg, cfg.reward.threads, self.rank)
        self.reward.check_prompts(self.train_prompts + self.eval_prompts,
                                  f"prompts ({cfg.prompts.path or cfg.prompts.source})")
        self.ctx = self.rollout_context()
        self.eval_ctx = self.eval_context()

        # ---------------------------------------------------------------- resume
        self.ckpt_root = os.path.join(run_dir, "checkpoints")
        self.start_epoch, self.wall_offset = 0, 0.0
        if resume:
            tag = ckpt.latest_tag(self.ckpt_root)
            if tag is None:
                raise FileNotFoundError(f"--resume: no checkpoint under '{self.ckpt_root}'")
            state = ckpt.load_checkpoint(self.engine, self.ckpt_root, tag, self.rank)
            self.start_epoch = state["epoch"] + 1
            self.wall_offset = state["wall_s"]
            with torch.no_grad():
                for s, v in zip(self.ema.shadow, state["ema"]):
                    s.copy_(v)
            if self.main:  # drop metrics of epochs after the checkpoint (a killed run may have logged them)
                rows = [r for r in read_jsonl(self.metrics_path) if r["epoch"] <= state["epoch"]]
                atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        self.tb = None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.run_dir, "metrics.jsonl")

    def inference_weights(self):
        """ZeRO-3: gather the partitioned weights ONCE for a whole no-grad phase (rollout, evaluation) instead of once
        per module forward; DeepSpeed's unwrap_model_for_generation removes its fetch hooks for the block and puts
        them back after. A no-op for stages 1-2 (weights are whole on every rank)."""
        if not self.zero3:
            return nullcontext()
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation
        self.zero3_gathers += 1
        return unwrap_model_for_generation(self.engine)

    def _bar(self, total, desc):
        return tqdm(total=total, desc=desc, disable=not (self.main and self.cfg.run.progress), leave=False)

    def rollout_context(self) -> RolloutContext:
        """What the credit method may use: the model seam, schedule, rewards, velocity, rank geometry, progress."""
        return RolloutContext(cfg=self.cfg, models=self.models, sched=self.sched, reward=self.reward,
                              velocity=self.rollout_velocity, prompts=self.train_prompts,
                              rank=self.rank, world=self.world, n_local=self.n_local, n_global=self.n_global,
                              n_train_steps=self.n_train_steps, device=self.device, progress=self._bar)

    def eval_context(self) -> EvalContext:
        """What the evaluation may use: the network (the EMA weights swapped in by `evaluate`), the model seam, the
        evaluation schedule, rewards, rank geometry, where to write."""
        return EvalContext(cfg=self.cfg, transformer=self.engine.module, models=self.models,
                           sigmas=self.eval_sched.sigmas, reward=self.reward, rank=self.rank, world=self.world,
                           device=self.device, run_dir=self.run_dir, main=self.main,
                           progress=self.main and self.cfg.run.progress)

    # =================================================================================== the epoch
    def epoch_prompts(self, epoch: int) -> torch.Tensor:
        """(N,) global prompt ids: P prompts drawn for the epoch, each repeated G times (consecutive)."""
        g = seeding.generator("cpu", self.cfg.run.seed, epoch, seeding.TAG_PROMPTS)
        P = self.cfg.train.prompts_per_epoch
        n = len(self.train_prompts)
        ids = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(P / n))])[:P]
        return ids.repeat_interleave(self.rows_per_prompt)

    def run_epoch(self, epoch: int) -> dict:
        """One epoch: rollout -> rewards -> credit -> update -> its metrics row (`run` logs it and saves)."""
        cfg, dev = self.cfg, self.device
        t0 = time.perf_counter()
        prompt_ids = self.epoch_prompts(epoch)
        local_ids = prompt_ids[self.rank * self.n_local:(self.rank + 1) * self.n_local]
        group_ids = torch.arange(self.n_global) // self.credit.group_size(cfg.train.group_size)
        self.engine.module.eval()
        self.rollout_velocity.velocity.nfe = 0
        counts0 = self.reward.calls, self.reward.images, _ZERO3_FETCHES[0], self.zero3_gathers
        error, t_roll = None, t0
        try:  # a reward (or the rollout) failing on one rank: every rank must hear it, none may hang
            # ------------------------------------------------------------ rollout (credit/, rollout/driver.py)
            with torch.no_grad(), self.inference_weights():
                rollout = self.credit.rollout(self.ctx, local_ids, epoch)
            rollout_fetches = _ZERO3_FETCHES[0] - counts0[2]
            t_roll = time.perf_counter()
            # ------------------------------------------------------------ rewards (scored in the reward threads)
            local_scores, components = rollout.wait_rewards(), rollout.component_scores()  # (n_local, R), R-th final
        except Exception as exc:
            error = exc
        raise_if_any_failed(error, dev, f"epoch {epoch}: rollout and rewards")
        t_rew = time.perf_counter()

        # ---------------------------------------------------------------- credit (credit/: global, every rank)
        advantages, final_rewards, credit_stats = self._credit(epoch, local_scores, group_ids, prompt_ids)

        # ---------------------------------------------------------------- update (train/objective.py)
        self.engine.module.train()
        train_stats = self._train(epoch, rollout, advantages, local_ids)
        t_train = time.perf_counter()

        # ---------------------------------------------------------------- log (the epoch's row)
        slow = faults.slow_seconds(self.rank)
        if slow:  # fault injection: this rank's clock runs ahead of the others'
            time.sleep(slow)
        return self._epoch_row(epoch, rollout, final_rewards, components, {**train_stats, **credit_stats},
                               (t0, t_roll, t_rew, t_train), counts0, rollout_fetches)

    def _credit(self, epoch: int, local_scores: torch.Tensor, group_ids: torch.Tensor, prompt_ids: torch.Tensor):
        """Gathered (N, R) scores -> this rank's (n_local, T) advantages, the (N,) final rewards and the credit
        statistics; every rank computes the same advantages (run.debug_dump: what each rank saw, for the 2-rank
        test)."""
        all_scores = all_gather_cat(local_scores.to(self.device)).cpu()
        adv_all, credit_stats = self.credit.advantages(all_scores, group_ids, self.cfg.train)
        if self.cfg.run.debug_dump:
            os.makedirs(os.path.join(self.run_dir, "debug"), exist_ok=True)
            torch.save({"scores": all_scores, "advantages": adv_all, "prompt_ids": prompt_ids},
                       os.path.join(self.run_dir, "debug", f"credit_e{epoch}_rank{self.rank}.pt"))
        return adv_all[self.rank * self.n_local:(self.rank + 1) * self.n_local], all_scores[:, -1], credit_stats

    def _epoch_row(self, epoch: int, rollout, final_rewards: torch.Tensor, components: dict, stats: dict,
                   times: tuple, counts0: tuple, rollout_fetches: int) -> dict:
        """The epoch's metrics row, summed over the ranks: rewards, the training and credit statistics, seconds per
        phase, network evaluations, decodes, reward calls and images, each reward component; ZeRO-3 gathers."""
        dev = self.device
        t0, t_roll, t_rew, t_train = times
        calls0, images0, _, gathers0 = counts0
        dt = t_train - t0
        row = {
            "epoch": epoch, "reward_mean": final_rewards.mean().item(), "reward_std": final_rewards.std().item(),
            **stats,
            "rollout_s": t_roll - t0, "reward_s": t_rew - t_roll, "train_s": t_train - t_rew, "epoch_s": dt,
            "images_per_s": self.n_global / dt,
            "nfe": int(all_reduce_sum_int(self.rollout_velocity.nfe, dev)),
            "completion_nfe": int(all_reduce_sum_int(rollout.completion_nfe, dev)),
            "decodes": int(all_reduce_sum_int(rollout.decodes, dev)),
            "reward_calls": int(all_reduce_sum_int(self.reward.calls - calls0, dev)),
            "reward_images": int(all_reduce_sum_int(self.reward.images - images0, dev)),
        }
        row.update(self._component_metrics(components))
        if self.zero3:  # the rollout gathers once per phase: no per-module fetches inside it
            row["zero3_rollout_gathers"] = int(all_reduce_sum_int(self.zero3_gathers - gathers0, dev))
            row["zero3_rollout_fetches"] = int(all_reduce_sum_int(rollout_fetches, dev))
        return row

    def _component_metrics(self, components: dict) -> dict:
        """reward/<name>_mean, _std (raw scores of the final images, all ranks) and _weighted (its share)."""
        names = sorted(self.reward.weights)
        sums = torch.zeros(len(names), 3, dtype=torch.float64)
        for j, n in enumerate(names):
            x = components[n].double()
            sums[j] = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), dtype=torch.float64)])
        sums = all_reduce_sum(sums.to(self.device)).cpu()
        out = {}
        for j, n in enumerate(names):
            s, ss, c = sums[j].tolist()
            mean = s / max(c, 1.0)
            var = (ss - c * mean * mean) / max(c - 1.0, 1.0)
            out[f"reward/{n}_mean"] = mean
            out[f"reward/{n}_std"] = max(var, 0.0) ** 0.5
            out[f"reward/{n}_weighted"] = self.reward.weights[n] * mean
        return out

    def _micro_batch_logprob(self, rollout, idx: torch.Tensor, prompts: list, grad: bool,
                             reference: Optional[bool] = None):
        """Policy log-prob (and KL to the reference) of the stored transitions of the (trajectory, step) pairs idx.

        idx (M, 2) -> log_prob (M,), kl (M,) fp32, differentiable in the LoRA weights when grad is True.
        reference: run the reference (adapter-off) forward for the KL (default: train.beta_kl > 0); without it the
        KL is zero. Pairs that leave the same state (rollout.state_rows: TempFlow-GRPO's K branches of one z_k)
        share one velocity: the network runs once per distinct (z_k, sigma_k, prompt) of the micro-batch and its
        output is broadcast to the pairs (the gradient sums over them), the same values as one forward per pair."""
        tc, sc, dev = self.cfg.train, self.cfg.sampling, self.device
        if reference is None:
            reference = tc.beta_kl > 0
        i, k = idx[:, 0], idx[:, 1]
        iu, ku, inv = distinct_states(rollout.state_rows, i, k)
        kk, kku = k.to(dev), ku.to(dev)
        zu, zn = rollout.latents[iu, ku].to(dev), rollout.latents[i, k + 1].to(dev)
        cond = self.ctx.conditioning([prompts[j] for j in iu.tolist()])
        t = self.sched.sigmas[kku]
        expand = (lambda x: x) if inv is None else (lambda x: x[inv.to(dev)])
        with torch.set_grad_enabled(grad):
            gv = GuidedVelocity(self.engine if grad else self.engine.module, sc.guidance,
                                grad_uncond=tc.cfg_grad == "both", family=self.models.family)
            v = expand(gv(zu, t, cond))
        self.train_forwards += gv.nfe
        v_ref = None
        if reference:
            with torch.no_grad(), adapter_disabled(self.engine.module):
                gr = GuidedVelocity(self.engine.module, sc.guidance, family=self.models.family)
                v_ref = expand(gr(zu, t, cond))
            self.train_forwards += gr.nfe
        z = expand(zu)
        levels = rollout.noise_levels[i].to(dev) if rollout.noise_levels.dim() == 2 else rollout.noise_levels
        with torch.set_grad_enabled(grad):
            return ops.sde_logprob(z, v, zn, self.sched.sigmas, levels, kk, v_ref, sc.variant,
                                   sc.logprob_reduction, sc.cps_logprob)

    def _train(self, epoch: int, rollout, advantages: torch.Tensor, local_ids: torch.Tensor) -> dict:
        """Clipped-ratio GRPO on every (trajectory, trained step) pair, micro-batched, gradients accumulated: the
        objective's pairs, padding, window normalisation, loss and statistics (train/objective.py) around DeepSpeed's
        accumulation boundaries and the rank-agreed finiteness check of each optimizer window.

        Normalisation: the gradient of one optimizer window is the weighted mean over the window's valid pairs on
        all ranks, (1 / N_window) sum_i w_i (L_i + beta KL_i), whatever the micro-batch padding and however many
        ranks share the pairs (DeepSpeed averages gradients over ranks, hence the factor `world`). Padding pairs
        carry weight 0 in both terms. TempFlow-GRPO's noise-aware step weights multiply the KL term too: one weight
        per pair scales that pair's whole objective.
        """
        cfg, tc, dev = self.cfg, self.cfg.train, self.device
        g = seeding.generator("cpu", cfg.run.seed, epoch, self.rank, seeding.TAG_PAIRS)
        pairs = objective.select_pairs(rollout.train_mask, advantages, self.n_train_steps, tc.drop_zero_advantage, g,
                                       rollout.state_rows)               # (P, 2): trajectory, step
        mb = tc.micro_batch
        n_micro = max(1, all_reduce_max(objective.micro_steps(pairs.shape[0], mb), dev))  # same count on every rank
        pairs, valid = objective.pad_pairs(pairs, n_micro, mb)
        window, win_valid = objective.optimizer_windows(valid, mb, tc.optimizer_steps_per_epoch)
        win_valid = all_reduce_sum(win_valid.double().to(dev)).cpu()   # valid pairs per window, all ranks
        step_w = self.credit.step_weights()                              # (T,) or None
        prompts = [self.train_prompts[i] for i in local_ids.tolist()]
        old_lp = rollout.log_probs[pairs[:, 0], pairs[:, 1]]             # (n_micro * mb,)
        self.train_forwards = 0
        if tc.old_log_prob == "recompute":  # the old policy's log-prob in the training layout (see config)
            with torch.no_grad():
                old_lp = torch.cat([self._micro_batch_logprob(rollout, pairs[m * mb:(m + 1) * mb], prompts, False,
                                                              reference=False)[0].cpu() for m in range(n_micro)])
        stats = objective.LossStatistics(self.sched.steps, mb, tc.clip_range, dev)
        bar = self._bar(n_micro, f"train {epoch}")
        window_losses = []  # the window's losses, on the device: checked once, before the window's optimizer step
        nan_fault = faults.nan_loss(self.rank)
        for m in range(n_micro):
            idx = pairs[m * mb:(m + 1) * mb]
            ok = valid[m * mb:(m + 1) * mb]
            i, k = idx[:, 0], idx[:, 1]
            lp, kl = self._micro_batch_logprob(rollout, idx, prompts, True)
            old = old_lp[m * mb:(m + 1) * mb].to(dev)
            loss = objective.pair_loss(lp, old, advantages[i, k].to(dev), ok, k, step_w, tc.clip_range, kl,
                                       tc.beta_kl)
            if nan_fault:
                loss = loss * float("nan")
            window_losses.append(loss.detach())
            win = m // window
            boundary = objective.is_boundary(m, n_micro, window)
            self.engine.set_gradient_accumulation_boundary(boundary)
            self.engine.backward(loss * objective.window_scale(mb, self.world, win_valid[win]), scale_wrt_gas=False)
            if boundary:  # no host sync per micro-step: every rank agrees once per window, before the step applies it
                self._check_finite(epoch, window_losses, win * window, pairs, mb)
                window_losses = []
            self.engine.step()
            if boundary:
                self.ema.update()
            stats.add(loss, lp, old, kl, ok, k)
            bar.update(1)
        bar.close()
        st = stats.metrics(self.n_global * self.sched.steps, all_reduce_sum, lambda x: agree_max(x, dev))
        kl_per_step = st.pop("kl_per_step")
        return {**st, "micro_steps": n_micro,
                "train_nfe": all_reduce_sum_int(self.train_forwards, dev),  # as run: recompute, policy, reference
                "kl_per_step": kl_per_step}

    def _check_finite(self, epoch: int, losses: list, m0: int, pairs: torch.Tensor, mb: int) -> None:
        """The agreed finiteness check of one optimizer window (micro-steps m0, m0 + 1, ...): one host copy of its
        losses; a non-finite one on any rank stops every rank, naming the rank, the micro-batch and its steps."""
        vals = torch.stack(losses).cpu()
        bad = (~torch.isfinite(vals)).nonzero().flatten()
        error = None
        if bad.numel():
            m = m0 + int(bad[0])
            error = NonFiniteLossError(f"epoch {epoch}, micro-batch {m}: loss is {float(vals[bad[0]])} (steps "
                                       f"{pairs[m * mb:(m + 1) * mb, 1].tolist()}); check sampling.noise_level and "
                                       f"train.lr")
        raise_if_any_failed(error, self.device, f"epoch {epoch}: training")

    # =================================================================================== evaluation
    @torch.no_grad()
    def evaluate(self, epoch: int, shadow=None) -> dict:
        """ODE sampler (eval_steps, CFG) on the held-out prompts with the EMA weights (or the EMA snapshot `shadow`);
        rank-sharded."""
        with self.ema.swapped(shadow), self.inference_weights():
            return evaluate_prompts(self.eval_ctx, self.eval_prompts, epoch)

    # =================================================================================== the run
    def log(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "epoch":
                self.tb.add_scalar(k, v, row["epoch"])
        self.tb.flush()

    def run(self) -> list[dict]:
        """Epochs until run.epochs or the wall-clock budget. Every decision that leads to a collective (evaluate,
        save, stop) is taken from values all ranks agree on: the epoch index and the largest training clock."""
        cfg, dev = self.cfg, self.device
        rows = []
        if self.cfg.eval.enabled and self.start_epoch == 0:
            self.log({"epoch": -1, "wall_s": 0.0, **base_evaluation(self.eval_ctx, lambda: self.evaluate(-1))})
        start = time.perf_counter()  # training wall-clock: evaluations are not counted
        # Evaluation at fixed training seconds (run.eval_every_s, and the budget itself): the score at point t is
        # that of the last state whose training clock is <= t (the EMA snapshot before the epoch that crosses t), so
        # no method is scored with more training seconds than another.
        every = cfg.run.eval_every_s
        budget = cfg.run.wall_clock_budget_s
        next_point = every * (math.floor(self.wall_offset / every) + 1) if every > 0 else math.inf
        snapshots = cfg.eval.enabled and (every > 0 or (cfg.run.eval_at_budget and budget > 0))

        def snapshot():  # the EMA weights as of now (only kept when evaluation points are possible)
            return [s.clone() for s in self.ema.shadow] if snapshots else None
        prev_shadow, prev_wall, prev_epoch = snapshot(), self.wall_offset, self.start_epoch - 1
        for epoch in range(self.start_epoch, cfg.run.epochs):
            row = self.run_epoch(epoch)
            row["wall_s"] = agree_max(self.wall_offset + time.perf_counter() - start, dev)
            last = epoch == cfg.run.epochs - 1
            budget_hit = budget > 0 and row["wall_s"] >= budget
            points = []
            while cfg.eval.enabled and next_point <= row["wall_s"] and (budget <= 0 or next_point < budget):
                points.append(next_point)
                next_point += every
            if cfg.eval.enabled and budget_hit and (every > 0 or cfg.run.eval_at_budget):
                points.append(budget)
            if points:
                t = time.perf_counter()
                ev = self.evaluate(prev_epoch, prev_shadow)
                start += time.perf_counter() - t
                for p in points:
                    self.log({"epoch": prev_epoch, "eval_point_s": p, "wall_s": prev_wall, **ev})
            prev_shadow, prev_wall, prev_epoch = snapshot(), row["wall_s"], epoch
            # at the budget, the point just scored is the run's final figure: the state after the epoch that
            # crossed it (more training seconds than the budget) is not evaluated again
            scored_budget = budget_hit and budget in points
            if cfg.eval.enabled and not scored_budget and (last or budget_hit or
                                     (cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0)):
                t = time.perf_counter()
                row.update(self.evaluate(epoch))
                start += time.perf_counter() - t  # evaluation time is not training wall-clock
            self.log(row)
            rows.append(row)
            if self.main:
                print(f"epoch {epoch}: reward {row['reward_mean']:.4f} ± {row['reward_std']:.4f}  "
                      f"loss {row['loss']:.4g}  kl {row['kl']:.3g}  {row['epoch_s']:.1f}s", flush=True)
            if cfg.run.save_every and ((epoch + 1) % cfg.run.save_every == 0 or last or budget_hit):
                self.save(epoch, row["wall_s"])
            faults.kill_at("after_epoch", epoch)
            if budget_hit:
                if self.main:
                    print(f"wall-clock budget {cfg.run.wall_clock_budget_s:g} s reached after epoch {epoch} "
                          f"({row['wall_s']:.1f} s of training)", flush=True)
                break
        self.save_final()
        self.reward.close()
        return rows

    def _lora_dicts(self):
        """Collective under ZeRO-3 (every rank must call it)."""
        with gathered(self.trainable, self.zero3):
            sd = lora_state_dict(self.engine.module)
        with self.ema.swapped(), gathered(self.trainable, self.zero3):
            ema_sd = lora_state_dict(self.engine.module)
        return sd, ema_sd

    def save(self, epoch: int, wall_s: float) -> None:
        sd, ema_sd = self._lora_dicts() if (self.main or self.zero3) else (None, None)
        if not self.main:
            sd, ema_sd = None, None
        state = {"epoch": epoch, "wall_s": wall_s, "ema": [s.cpu() for s in self.ema.shadow]}
        ckpt.save_checkpoint(self.engine, self.ckpt_root, epoch, state, self.rank, sd, ema_sd,
                             lora_metadata(self.engine.module), device=self.device, family=self.models.family.name)

    def _summary_block(self, before: dict, after: dict, key: str) -> str:
        """The run's last lines: held-out figure before -> after, the paired gain over the base with its 95 % CI and
        verdict, the training seconds, and where the samples, metrics and LoRA are."""
        lines = ["== summary ==", f"held-out {key[5:]}: {before[key]:.3f} -> {after[key]:.3f}"]
        if "eval_diff_base" in after:
            lo, hi = after["eval_diff_base_ci_lo"], after["eval_diff_base_ci_hi"]
            from ..stats import verdict
            lines.append(f"paired gain over the base: {after['eval_diff_base']:+.3f} (95 % CI {lo:+.3f}, {hi:+.3f}), "
                         f"{verdict(lo, hi)}")
        lines.append(f"training seconds: {after.get('wall_s', float('nan')):.0f} (epochs 0-{after['epoch']})")
        for what, rel in (("samples (grid PNGs)", "samples"), ("metrics", "metrics.jsonl"), ("LoRA", "lora"),
                          ("EMA LoRA", "lora_ema")):
            lines.append(f"{what}: {os.path.join(self.run_dir, rel)}")
        return "\n".join(lines)

    def save_final(self) -> None:
        dicts = self._lora_dicts() if (self.main or self.zero3) else None
        if self.main:
            from ..credit.dense import plot_dense_rewards
            rows = read_jsonl(self.metrics_path)
            plot_dense_rewards(rows, os.path.join(self.run_dir, "dense_rewards.png"))
            evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
            if len(evals) >= 2:  # the figures before and after training, side by side
                keep = lambda r: {k: v for k, v in r.items() if k.startswith("eval_") or k in ("epoch", "wall_s")}  # noqa
                summary = {"before": keep(evals[0]), "after": keep(evals[-1])}
                atomic_write_text(os.path.join(self.run_dir, "eval_before_after.json"), json.dumps(summary, indent=1))
                key = "eval_strict_accuracy" if "eval_strict_accuracy" in evals[0] else "eval_reward_mean"
                print(self._summary_block(evals[0], evals[-1], key), flush=True)
            from ..models.lora import save_lora
            sd, ema_sd = dicts
            meta = lora_metadata(self.engine.module)
            save_lora(os.path.join(self.run_dir, "lora"), sd, meta, self.models.family.name)
            save_lora(os.path.join(self.run_dir, "lora_ema"), ema_sd, meta, self.models.family.name)
        barrier()

