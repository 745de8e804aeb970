"""The `densegrpo` sub-commands that are argument parsing around a library call: train (also `train.py`), prompts,
pretrain, eval, calibrate, train-scorer, scorer-figures. Each parses its own arguments; `densegrpo CMD --help` lists
them. The command table is `densegrpo_fast/cli.py`; this module never imports it."""
from __future__ import annotations

import argparse
import json
import os

from .utils.cli_helpers import _quiet, load_config_or_none


def train_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train.py", description="GRPO training (Flow-GRPO / DenseGRPO / TP / TempFlow)")
    p.add_argument("--config", required=False, help="YAML file in configs/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--run-dir", default=None, help="run folder (default: <run.output_dir>/<run.name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    _quiet()
    cfg = load_config_or_none(args.config, args.overrides)
    if cfg is None:
        return 2
    run_dir = args.run_dir or os.path.join(cfg.run.output_dir, cfg.run.name)
    from .train.trainer import Trainer
    Trainer(cfg, run_dir, resume=args.resume).run()
    return 0


def prompts_main(argv) -> int:
    p = argparse.ArgumentParser(prog="densegrpo prompts",
                                description="write the shapes train/validation/test prompt splits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder (default: the package's assets/shapes)")
    a = p.parse_args(argv)
    from .prompts.shapes import ASSET_DIR, write_splits
    write_splits(a.out or ASSET_DIR, a.seed)
    print(f"wrote {a.out or ASSET_DIR}/train.jsonl, validation.jsonl, test.jsonl")
    return 0


def pretrain_main(argv) -> int:
    p = argparse.ArgumentParser(prog="densegrpo pretrain", description="train the tiny SD3 shapes base model")
    p.add_argument("--out", required=True)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--dit-steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--init", default=None, help="continue the transformer of an earlier pretrain folder")
    a = p.parse_args(argv)
    _quiet()
    from .pretrain import pretrain
    log = pretrain(a.out, a.vae_steps, a.dit_steps, a.batch, a.seed, a.lr, a.threads, init=a.init)
    print(json.dumps({k: v for k, v in log.items() if k != "spec"}))
    return 0


def eval_main(argv) -> int:
    p = argparse.ArgumentParser(prog="densegrpo eval",
                                description="held-out shapes evaluation: ODE sampler, CFG, strict accuracy per category")
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped shapes model)")
    p.add_argument("--lora", default=None, help="a LoRA folder written by training (diffusers format)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--steps", type=int, default=10,
                   help="ODE steps (sampling.eval_steps: the training evaluation's 10 in configs/shapes_default.yaml, "
                        "so the figure compares with eval_strict_accuracy in a run's metrics.jsonl)")
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, default=3.0, help="schedule shift (sampling.shift)")
    p.add_argument("--max-sequence-length", type=int, default=4, help="T5 tokens (model.max_sequence_length)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (model.resolution; default: the model's)")
    p.add_argument("--out", default=None, help="folder for eval.json and grid.png")
    from .config import EvalConfig
    p.add_argument("--batch", type=int, default=EvalConfig().batch,
                   help="samples per ODE batch (eval.batch; 0 = auto: 256 on a GPU, 32 on the CPU; halved until it "
                        "fits in device memory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the sampler (model.compile; its graphs are kept in the compile cache). Default "
                        "off: the cold compile costs more than one evaluation gains (the shipped model on one core: "
                        "eager 92 s, compiled 84 s with a warm cache, 123 s cold; docs/results/eval_batch.md)")
    a = p.parse_args(argv)
    _quiet()
    from .eval import DEFAULT_MODEL, shapes_eval_from_folder
    res = shapes_eval_from_folder(a.model or DEFAULT_MODEL, a.lora, a.split, a.steps, a.guidance,
                                  a.samples_per_prompt, a.seed, a.out, shift=a.shift,
                                  max_sequence_length=a.max_sequence_length, resolution=a.resolution,
                                  batch=a.batch, progress=not a.no_progress, compile=a.compile)
    print(json.dumps(res, indent=1))
    return 0


def calibrate_main(argv) -> int:
    p = argparse.ArgumentParser(prog="densegrpo calibrate",
                                description="DenseGRPO exploration-space calibration (Algorithm 1)")
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", required=True, help="folder for noise_schedule.json and calibration.png")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=32, help="trajectories per round")
    p.add_argument("--eps1", default="auto",
                   help="balance threshold: a count (the paper: 2) or auto = 1.96 sqrt(#non-zero gains), which "
                        "recognises a balanced step with ~95%% probability")
    p.add_argument("--eps2", type=float, default=0.01)
    p.add_argument("--units", default="level", choices=["level", "noise"],
                   help="eps2 moves the stored level a_k (default) or the step's noise level s_k = a_k "
                        "sqrt(sigma/(1-sigma)) (the paper's Algorithm 1)")
    a = p.parse_args(argv)
    _quiet()
    cfg = load_config_or_none(a.config, a.overrides)
    if cfg is None:
        return 2
    from .credit.calibration import calibrate
    eps1 = a.eps1 if a.eps1 == "auto" else float(a.eps1)
    res = calibrate(cfg, a.out, a.rounds, a.n, eps1, a.eps2, units=a.units)
    print(f"wrote {os.path.join(a.out, 'noise_schedule.json')}: {res['noise_levels']}")
    return 0


def train_scorer_main(argv) -> int:
    p = argparse.ArgumentParser(prog="densegrpo train-scorer",
                                description="train the shapes world's learned scorer (a tiny CLIPModel) from scratch")
    p.add_argument("--out", required=True, help="folder (the shipped one: densegrpo_fast/assets/shapes_scorer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--hard", type=int, default=3, help="hard-negative captions per image")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pool", type=int, default=4096, help="VAE-reconstructed scenes drawn from")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    _quiet()
    from .pretrain.scorer import train_scorer
    log = train_scorer(a.out, a.seed, a.steps, a.batch, a.hard, a.lr, pool_size=a.pool, threads=a.threads)
    print(f"wrote {a.out} in {log['seconds']:.0f} s ({log['parameters']} parameters)")
    return 0


def scorer_figures_main(argv) -> int:
    p = argparse.ArgumentParser(prog="densegrpo scorer-figures",
                                description="the learned scorer's ranking of hard negatives and its agreement with "
                                            "the verifier on the test split")
    p.add_argument("--scorer", default=None, help="folder (default: the shipped scorer)")
    p.add_argument("--per-prompt", type=int, default=4, help="scenes / base-model samples per test prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures here")
    a = p.parse_args(argv)
    _quiet()
    from .pretrain.scorer import ASSET, figures_markdown, scorer_figures
    res = scorer_figures(a.scorer or ASSET, a.per_prompt, seed=a.seed, out_json=a.json)
    print(figures_markdown(res))
    print(f"({res['settings']['seconds']:.0f} s)")
    return 0
