"""The GPU check cannot rot: its CPU mode (`bash bench/gpu_check.sh --cpu OUT`) runs every phase's code with tiny
sizes and must write every figure; the wheel selection for a bare GPU image, the ops backend rule and the bundle's
make target are checked here too."""
import json
import math
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import PY, ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))


def _finite(d: dict, keys) -> None:
    for k in keys:
        assert k in d, f"missing {k}: {sorted(d)}"
        assert isinstance(d[k], (int, float)) and math.isfinite(d[k]), f"{k} = {d[k]!r}"


@pytest.mark.slow
def test_cpu_mode_runs_every_phase_and_writes_the_figures(tmp_path):
    # the timeout is generous: on a 2-core CI machine shared with the other xdist worker this takes minutes
    out = tmp_path / "out"
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--cpu", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": PY})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["errors"] == {}
    assert set(rep) >= {"env", "tests", "collective", "ops", "rollout", "train", "memory", "plan", "seconds"}
    for k in ("device", "torch", "triton", "python", "commit", "ops_backends", "wheels"):
        assert k in rep["env"], k
    assert rep["env"]["device"] == "cpu" and rep["env"]["mode"] == "cpu"
    assert rep["tests"]["rc"] == 0 and rep["tests"]["collected"] > 50    # the GPU tests import and collect
    assert rep["collective"]["backend"] == "gloo" and all(x["ok"] for x in rep["collective"]["ranks"])
    _finite(rep["collective"], ["allreduce_s", "allreduce_bus_GBps"])
    _finite(rep["ops"], ["copy_GBps", "matmul_bf16_TFLOPs"])
    assert {c["backend"] for c in rep["ops"]["cases"]} >= {"torch"}
    assert {c["op"] for c in rep["ops"]["cases"]} == {"sde_step", "sde_logprob fwd+bwd"}
    for c in rep["ops"]["cases"]:
        _finite(c, ["median_s", "GBps", "frac_copy_bw", "x_torch"])
    assert rep["ops"]["backend_decision"]["auto"] == "triton"           # nothing measured on a GPU here
    _finite(rep["rollout"], ["eager_s", "graph_s", "graph_speedup", "forward_GFLOP_per_row", "eager_TFLOPs",
                             "graph_TFLOPs", "graph_frac_matmul_rate", "max_abs_diff_latents",
                             "max_abs_diff_log_probs"])
    assert rep["rollout"]["max_abs_diff_latents"] == 0.0                 # on the CPU the graphs are the eager path
    assert rep["rollout"]["forward_GFLOP_per_row"] > 0
    _finite(rep["train"], ["step_s", "TFLOPs", "TFLOP_per_micro_step", "ratio_dev_first", "loss_first"])
    assert rep["train"]["ratio_dev_first"] < 1e-2
    _finite(rep["memory"], ["plan_total_bytes", "plan_rollout_bytes", "plan_train_bytes"])
    assert rep["memory"]["train_peak_bytes"] is None                     # no per-phase peak on the CPU
    table = (out / "table.md").read_text()
    assert "| rollout 10 steps" in table and "| train micro-step" in table and "ERROR" not in table
    assert r.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # the table is printed last


def _wheel(folder, name, version, requires=()):
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: %s\nVersion: %s\n%s\nbody\n" % (
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return str(path)


def test_wheel_selection_installs_what_the_image_lacks(tmp_path, monkeypatch):
    import gpu_wheels
    _wheel(tmp_path, "diffusers", "0.42.1", ["huggingface-hub>=1.32", "importlib_metadata", "pillow"])
    _wheel(tmp_path, "importlib_metadata", "10.2.0", ["zipp>=3.20"])
    _wheel(tmp_path, "zipp", "4.1.2")
    _wheel(tmp_path, "pillow", "13.0.0")
    _wheel(tmp_path, "pydantic", "2.14.4", ["typing-extensions>=4.16.0", 'tomli; python_version < "3.0"'])
    _wheel(tmp_path, "typing_extensions", "4.16.0")
    _wheel(tmp_path, "huggingface_hub", "2.4.0", ["httpx2>=2"])          # its own dependency is not bundled
    _wheel(tmp_path, "pytest", "9.2.0")
    image = {"torch": "2.6.0", "pillow": "11.0.0", "typing-extensions": "4.12.2", "huggingface-hub": "0.30.0",
             "pytest": "8.0.0", "zipp": "3.21.0"}
    monkeypatch.setattr(gpu_wheels, "_installed", lambda: dict(image))
    sel = gpu_wheels.select(str(tmp_path))
    got = sorted(os.path.basename(p).split("-")[0] for p in sel["install"])
    # absent -> installed; typing_extensions too old for pydantic -> replaced; the image's pillow, zipp and pytest
    # satisfy every requirement -> kept; hub too old but its replacement needs what is missing -> kept, reported
    assert got == ["diffusers", "importlib_metadata", "pydantic", "typing_extensions"]
    assert sel["keep"] == {"huggingface-hub": "0.30.0", "pillow": "11.0.0", "pytest": "8.0.0", "zipp": "3.21.0"}
    assert sel["unmet"] == ["diffusers: huggingface-hub>=1.32 (have 0.30.0)"]
    assert gpu_wheels.norm("Typing_Extensions") == "typing-extensions"


def test_ops_backend_rule_and_the_measured_file(tmp_path, monkeypatch):
    from densegrpo_fast import ops
    case = {"a": 1.0, "b": 2.0}
    assert ops.choose_cuda_backend({"triton": case})["auto"] == "triton"
    assert ops.choose_cuda_backend({"triton": case, "cuda": {"a": 0.97, "b": 1.94}})["auto"] == "triton"  # < 5 %
    d = ops.choose_cuda_backend({"triton": case, "cuda": {"a": 0.5, "b": 1.5}})
    assert d["auto"] == "cuda" and d["cases"] == 2 and d["ratio_cuda_over_triton"] == pytest.approx((0.5 * 0.75) ** 0.5)
    table = tmp_path / "measured.json"
    table.write_text(json.dumps({"Fake GPU": {"auto": "cuda"}, "Other GPU": {"auto": "triton"}}))
    monkeypatch.setenv("DENSEGRPO_OPS_MEASURED", str(table))
    monkeypatch.setattr(ops, "_MEASURED", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: {0: "Fake GPU", 1: "Other GPU"}.get(i, "?"))
    assert ops.measured_cuda_backend(torch.device("cuda", 0)) == "cuda"
    assert ops.measured_cuda_backend(torch.device("cuda", 1)) == "triton"
    assert ops.measured_cuda_backend(torch.device("cuda", 2)) is None
    assert ops.resolve_backend(torch.device("cpu"), "auto") in ("cpp", "torch")  # the CPU rule is unchanged


@pytest.mark.slow
def test_gpu_bundle_target_downloads_for_the_gpu_python():
    r = subprocess.run(["make", "-n", "gpu-bundle"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--python-version 3.12" in r.stdout and "--only-binary=:all:" in r.stdout
    assert "DS_BUILD_OPS=0" in r.stdout and "pip wheel" in r.stdout and "--no-build-isolation" in r.stdout
    import gpu_wheels
    pins = gpu_wheels.pins()
    assert any(p.startswith("diffusers==") for p in pins) and gpu_wheels.pins(sdist=True)[0].startswith("deepspeed==")
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert ".whl/" in f.read().split()
