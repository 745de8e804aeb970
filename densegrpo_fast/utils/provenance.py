"""What produced a run: `run_info.json` in every run folder (code commit, package versions, machine, command line).

`write_run_info(run_dir)` is called once by rank 0 when a run starts. A resumed run keeps the first start's record
and appends its own start to `resumed`, so a folder trained in several parts names every machine and commit that
touched it. `collect()` is the same record without writing it (`densegrpo compare` puts it in its report).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Optional

PACKAGES = ("torch", "diffusers", "transformers", "deepspeed", "peft", "numpy")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _git(*args: str) -> Optional[str]:
    try:
        r = subprocess.run(["git", "-C", _ROOT, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def gpu_name() -> Optional[str]:
    """The first CUDA device's name, or None on a machine without one (torch is not imported just for this)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return None


def collect(argv: Optional[list] = None) -> dict:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    torch = sys.modules.get("torch")
    threads = None
    if torch is not None:
        try:
            threads = torch.get_num_threads()
        except Exception:
            pass
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in PACKAGES},
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "gpu": gpu_name(),
        "host": platform.node(),
        "command": " ".join(argv if argv is not None else [os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_run_info(run_dir: str, argv: Optional[list] = None) -> dict:
    """Write (or, on a resume, extend) <run_dir>/run_info.json; returns the record of this start."""
    from .io import atomic_write_text
    info = collect(argv)
    path = os.path.join(run_dir, "run_info.json")
    record = info
    if os.path.exists(path):
        try:
            with open(path) as f:
                record = json.load(f)
            record.setdefault("resumed", []).append(info)
        except (OSError, ValueError):
            record = info
    atomic_write_text(path, json.dumps(record, indent=1))
    return info


def read_run_info(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, "run_info.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def describe(info: Optional[dict]) -> str:
    """One line: commit (dirty), CPU x threads, GPU, torch version."""
    if not info:
        return "no run_info.json"
    c = (info.get("commit") or "unknown")[:7] + (" (dirty)" if info.get("dirty") else "")
    pk = info.get("packages") or {}
    return (f"commit {c}, {info.get('cpu') or 'unknown CPU'} ({info.get('cpu_count')} CPUs, "
            f"{info.get('torch_threads')} torch threads), GPU {info.get('gpu') or 'none'}, torch {pk.get('torch')}, "
            f"Python {info.get('python')}")
