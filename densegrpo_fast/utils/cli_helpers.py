"""What every sub-command shares: quiet third-party logging and the config loaded or its error printed.

Imports nothing heavy at module level (the `densegrpo` command table imports it to print its help), and never
imports `densegrpo_fast.cli`.
"""
from __future__ import annotations

import os
import sys


def quiet() -> None:
    """Offline Hugging Face hub, and no progress bars or warnings from diffusers / transformers."""
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


_quiet = quiet  # the name the sub-commands have always used


def load_config_or_none(path, overrides):
    """The validated config, or None after printing the config error (the caller exits with 2)."""
    from ..config import ConfigError, load_config
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return None
