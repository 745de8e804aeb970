"""The CUDA sources compile with the machine's nvcc (no GPU needed); the GPU paths run only where CUDA is."""
import os
import shutil
import subprocess

import pytest
import torch

from conftest import ROOT


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    r = subprocess.run(["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-c", os.path.join(ROOT, "csrc", "sde_ops_kernels.cu"),
                        "-o", str(tmp_path / "k.o")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_match_reference(backend, dtype):
    from densegrpo_fast import ops
    from densegrpo_fast.ops import reference
    from densegrpo_fast.rollout.schedule import flow_sigmas
    if backend not in ops.available_backends():
        pytest.skip(f"{backend} not built")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, shape = 7, (16, 33, 31)
    z, v, zn, vr = (torch.randn(B, *shape, generator=g, device="cuda").to(dtype) for _ in range(4))
    sig, lv = flow_sigmas(10, device="cuda"), torch.full((10,), 0.7, device="cuda")
    k = torch.randint(0, 9, (B,), generator=g, device="cuda")
    v1 = v.clone().requires_grad_(True)
    lp, kl = ops.sde_logprob(z, v1, zn, sig, lv, k, vr, backend=backend)
    (lp.sum() + kl.sum()).backward()
    v64 = v.double().requires_grad_(True)
    lp64, kl64 = reference.sde_logprob(z.double(), v64, zn.double(), sig.double(), lv.double(), k, vr.double())
    (lp64.sum() + kl64.sum()).backward()
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(lp.double(), lp64, rtol=tol, atol=tol)
    assert torch.allclose(kl.double(), kl64, rtol=tol, atol=tol)
    assert torch.allclose(v1.grad.double(), v64.grad, rtol=tol * 5, atol=tol * 5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_binding_compiles_with_nvcc(tmp_path):
    """csrc/sde_ops_cuda.cpp (the torch binding with the shared input checks) compiles against this torch's headers.
    The CPU wheel lacks one cmake-generated CUDA header (c10/cuda/impl/cuda_cmake_macros.h): a stub stands in."""
    import sysconfig
    from torch.utils.cpp_extension import include_paths
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    inc = [f"-I{p}" for p in include_paths()] + [f"-I{tmp_path / 'stub'}", f"-I{sysconfig.get_paths()['include']}"]
    r = subprocess.run(["nvcc", "-std=c++17", "-O0", "-c", os.path.join(ROOT, "csrc", "sde_ops_cuda.cpp"), *inc,
                        "-DTORCH_EXTENSION_NAME=_C_cuda", "-o", str(tmp_path / "b.o")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "b.o").stat().st_size > 0


def test_cpu_binding_rejects_bad_inputs_with_named_errors():
    """The shared checks (csrc/sde_ops_checks.h) as the CPU binding applies them: dtype, shape, contiguity and the
    coefficient tensors are named in the error; an empty batch is fine."""
    from densegrpo_fast import ops
    if ops.unavailable_reason("cpp"):
        pytest.skip(f"cpp: {ops.unavailable_reason('cpp')}")
    mod = ops._module("cpp")
    z = torch.randn(2, 3, 4)
    a, c = torch.ones(2), torch.ones(2)
    with pytest.raises(RuntimeError, match="noise must have the latent's dtype"):
        mod.sde_step(z, z, z.double(), a, c, a)
    with pytest.raises(RuntimeError, match="velocity has shape"):
        mod.sde_step(z, torch.randn(2, 2, 4), z, a, c, a)
    with pytest.raises(RuntimeError, match="next_latent must be contiguous"):
        mod.sde_logprob_forward(z, z, z.transpose(1, 2).contiguous().transpose(1, 2), None, a, c)
    with pytest.raises(RuntimeError, match="alpha must be a contiguous float32"):
        mod.sde_logprob_forward(z, z, z, None, a.double(), c)
    with pytest.raises(RuntimeError, match="latent has unsupported dtype"):
        mod.sde_step(z.int(), z, z.int(), a, c, a)
    with pytest.raises(RuntimeError, match="grpo_loss: weights must be"):
        mod.grpo_loss_forward(a, a, a, torch.ones(3), 0.1)
    e = torch.empty(0, 3, 4)
    nxt, sq = mod.sde_step(e, e, e, torch.empty(0), torch.empty(0), torch.empty(0))
    assert nxt.shape == e.shape and sq.shape == (0,)
