"""`densegrpo` command line: a table of sub-commands, each resolved only when it runs.

COMMANDS maps a sub-command's name to "module:function" and one line of help. `densegrpo --help` lists the table
without importing any of the modules (so without torch); `densegrpo NAME ARGS...` imports NAME's module with
importlib and calls `function(ARGS)`, which parses its own arguments (`densegrpo NAME --help`) and returns the exit
status. Commands marked quiet get `utils.cli_helpers.quiet()` (offline hub, no third-party progress bars) before
their module is imported; the others call it themselves after parsing.

No module of the package imports this one: what sub-commands share lives in `densegrpo_fast/utils/cli_helpers.py`.
Adding a sub-command is one row here.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, NamedTuple


class Command(NamedTuple):
    target: str          # "module:function"; function(argv: list[str]) -> int
    help: str
    quiet: bool = False  # call cli_helpers.quiet() before importing the module


COMMANDS: dict[str, Command] = {
    "train": Command("densegrpo_fast.tools:train_main",
                     "GRPO training (Flow-GRPO / DenseGRPO / TP / TempFlow); also `python train.py`"),
    "prompts": Command("densegrpo_fast.tools:prompts_main", "write the shapes train/validation/test prompt splits"),
    "pretrain": Command("densegrpo_fast.tools:pretrain_main", "train the tiny SD3 shapes base model"),
    "eval": Command("densegrpo_fast.tools:eval_main",
                    "held-out shapes evaluation: ODE sampler, CFG, strict accuracy per category"),
    "calibrate": Command("densegrpo_fast.tools:calibrate_main",
                         "DenseGRPO exploration-space calibration (Algorithm 1)"),
    "compare": Command("densegrpo_fast.experiments.compare:compare_main",
                       "chosen methods on the same task, the same seeds, the same wall-clock budget", quiet=True),
    "plan": Command("densegrpo_fast.plan:plan_main",
                    "will this recipe fit? per-GPU memory and network work of one epoch", quiet=True),
    "reward-server": Command("densegrpo_fast.rewards.remote:server_main", "serve a registered reward over HTTP",
                             quiet=True),
    "train-scorer": Command("densegrpo_fast.tools:train_scorer_main",
                            "train the shapes world's learned scorer (a tiny CLIPModel) from scratch"),
    "scorer-figures": Command("densegrpo_fast.tools:scorer_figures_main",
                              "the learned scorer's ranking of hard negatives and its agreement with the verifier"),
    "diagnose": Command("densegrpo_fast.diagnose:diagnose_main",
                        "the signal dense credit would get from this config's model, reward and schedule"),
}


def resolve(name: str) -> Callable[[list], int]:
    """The function of sub-command `name` (its module imported now). An ImportError here is a broken install: it
    surfaces with its traceback."""
    module, _, function = COMMANDS[name].target.partition(":")
    return getattr(importlib.import_module(module), function)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: only the table's names and help (no sub-command module is imported)."""
    p = argparse.ArgumentParser(prog="densegrpo", description="GRPO with dense step-wise rewards for flow-matching "
                                "text-to-image models. `densegrpo COMMAND --help` lists a command's options.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, title="commands")
    for name, cmd in COMMANDS.items():
        sub.add_parser(name, help=cmd.help, add_help=False)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        if COMMANDS[argv[0]].quiet:
            from .utils.cli_helpers import quiet
            quiet()
        return resolve(argv[0])(argv[1:])
    try:  # --help lists the commands (exit 0); no command or an unknown one is a usage error (exit 2)
        build_parser().parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code is None else int(exc.code)
    return 2


if __name__ == "__main__":
    sys.exit(main())
