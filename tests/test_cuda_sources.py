"""The CUDA sources compile with the machine's nvcc (no GPU needed); the GPU paths run only where CUDA is."""
import os
import shutil
import subprocess

import pytest
import torch

from conftest import ROOT


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
