"""One training epoch (rollout -> rewards -> credit -> loss -> optimizer) with the fused ops against the torch
reference ops, side by side in one process on the same Trainer (tiny SD3 model, JPEG reward, CPU or GPU)."""
import os
import tempfile

import pytest

from densegrpo_fast import ops
from densegrpo_fast.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRAINER = {}


def _trainer(method):
    if method not in _TRAINER:
        from densegrpo_fast.train.trainer import Trainer
        cfg = load_config(os.path.join(ROOT, "configs", "tiny_jpeg.yaml"),
                          ["run.progress=false", "run.save_every=0", f"credit.method={method}", "train.beta_kl=0.01"])
        _TRAINER[method] = Trainer(cfg, tempfile.mkdtemp(prefix="bench_epoch_"))
    return _TRAINER[method]


FAST = "triton" if "triton" in ops.available_backends() and os.environ.get("TRITON_INTERPRET") != "1" else "cpp"


@pytest.mark.parametrize("method", ["sparse", "dense"])
@pytest.mark.parametrize("backend", ["torch", FAST])
def test_epoch(benchmark, backend, method):
    tr = _trainer(method)
    ops.set_backend(backend)
    try:
        rows = []
        benchmark.pedantic(lambda: rows.append(tr.run_epoch(0)), rounds=3, warmup_rounds=1)
    finally:
        ops.set_backend("auto")
    last = rows[-1]
    benchmark.extra_info.update({k: round(last[k], 4) for k in ("rollout_s", "reward_s", "train_s")})
    benchmark.extra_info["nfe"] = last["nfe"]
