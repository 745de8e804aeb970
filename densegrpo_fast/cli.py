"""`densegrpo` command line: train (also `train.py`), and the tools of the other stages."""
from __future__ import annotations

import argparse
import os
import sys


def _quiet():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    try:
        from diffusers.utils import logging as dl
        dl.disable_progress_bar()
        dl.set_verbosity_error()
        from transformers.utils import logging as tl
        tl.disable_progress_bar()
        tl.set_verbosity_error()
    except Exception:
        pass


def load_config_or_none(path, overrides):
    """The validated config, or None after printing the config error (the caller exits with 2)."""
    from .config import ConfigError, load_config
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return None


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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import tools  # an ImportError here is a broken install: let it surface with its traceback
    cmds = {"train": train_main, **tools.COMMANDS}
    if not argv or argv[0] not in cmds:
        print(f"usage: densegrpo {{{','.join(cmds)}}} ...", file=sys.stderr)
        return 2
    return cmds[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
