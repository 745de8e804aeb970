import os
import sys

import pytest
import torch

# Triton kernels run under the interpreter on a CPU-only machine (must be set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN, so a kernel that skips elements cannot pass."""
    return torch.full_like(t, float("nan"))


def assert_close(actual, expected, dtype, what=""):
    """Per-dtype tolerances; reports NaN/inf and the first mismatching indices."""
    tol = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2),
           torch.float16: (5e-3, 5e-3)}[dtype]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), f"{what}: NaN/inf mismatch"
    bad = ~torch.isclose(a, e, rtol=tol[0], atol=tol[1])
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{what} ({dtype}): {int(bad.sum())} mismatches, first at {idx}: "
                             f"{[a[tuple(i)].item() for i in idx]} vs {[e[tuple(i)].item() for i in idx]}")


def sd3_cond(embeds, pooled, neg_embeds, neg_pooled):
    """An SD3 conditioning bundle (what SD3Family.encode + the CFG negative give) from four tensors."""
    from densegrpo_fast.models.base import Cond
    return Cond(embeds=embeds, pooled=pooled, neg_embeds=neg_embeds, neg_pooled=neg_pooled)


def sd3():
    from densegrpo_fast.models.sd3 import SD3Family
    return SD3Family()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from densegrpo_fast.config import TinyModelConfig
    from densegrpo_fast.models.sd3 import build_tiny_sd3
    folder = str(tmp_path_factory.mktemp("tiny") / "model")
    build_tiny_sd3(folder, ["a", "red", "blue", "green", "circle", "square"], TinyModelConfig(), seed=0)
    return folder


@pytest.fixture(scope="module")
def net():
    """A tiny SD3 transformer in fp64 and the batch of every forward it runs (counted by a pre-hook): the network of
    the staircase and forward-count tests. Module scope: each test module counts its own forwards."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8).double().eval()
    calls = []
    m.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["hidden_states"].shape[0]),
                                with_kwargs=True)
    return m, calls


def backend_params(include_torch: bool = True) -> list:
    """Every op backend as a pytest param: a backend that cannot run here for a legitimate reason (no GPU, an
    extension the install did not attempt) is skipped with that reason; one the install built but that does not
    import is NOT skipped, so its tests fail loudly instead of the list silently shrinking."""
    from densegrpo_fast import ops
    out = []
    for b in ("torch", "cpp", "triton", "cuda"):
        if b == "torch" and not include_torch:
            continue
        reason = ops.unavailable_reason(b)
        marks = [pytest.mark.skip(reason=f"{b}: {reason}")] if reason and not (ops.expected(b) and
                                                                               "CUDA" not in reason) else []
        out.append(pytest.param(b, marks=marks, id=b))
    return out


def backend_device(backend: str) -> torch.device:
    """Where a backend's inputs live: cuda for the CUDA extension (and Triton on a GPU), else the CPU."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def fixed_seed(*parts) -> int:
    """A fixed seed from test parameters (not hash(), which Python salts per process)."""
    from densegrpo_fast.utils.seeding import fold
    return fold(*[sum(map(ord, str(p))) for p in parts]) % 2 ** 31


def build_tiny_clip(folder: str, words: list) -> str:
    """A tiny random CLIPModel (32 px images, 16-d projection) with a CLIP tokenizer over `words` and a
    preprocessor_config.json, saved as a local transformers folder: what a real PickScore / CLIP checkpoint is."""
    import json
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from densegrpo_fast.models.tokenizers import write_clip_tokenizer
    from densegrpo_fast.rewards.clip import CLIP_MEAN, CLIP_STD
    write_clip_tokenizer(folder, words, 16)
    tok = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    m = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16, logit_scale_init_value=3.0))
    m.save_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
                   "crop_size": {"height": 32, "width": 32}, "image_mean": list(CLIP_MEAN),
                   "image_std": list(CLIP_STD), "do_resize": True, "do_center_crop": True}, f)
    return folder


# The fast tier (`make test-fast`: unit tests, ops, credit by hand, config) launches none of the project's processes
# (Python, the DeepSpeed launcher, a shell script, make, nvcc). A test that does belongs to the full tier: mark it
# `slow`. In the fast tier such a launch fails the test naming the rule, so the tier cannot silently grow slow.
_HEAVY = ("python", "deepspeed", "bash", "sh", "make", "nvcc", "torchrun")


@pytest.fixture(autouse=True)
def _fast_tier_launches_nothing(monkeypatch):
    if os.environ.get("DENSEGRPO_TEST_TIER") != "fast":
        yield
        return
    import subprocess
    real = subprocess.Popen

    class NoLaunch(real):
        def __init__(self, args, *a, **k):
            argv = [args] if isinstance(args, (str, bytes)) else list(args)
            prog = os.path.basename(str(argv[0]).split()[0]) if argv else ""
            if prog.startswith(_HEAVY) or prog == os.path.basename(PY):
                raise RuntimeError(f"the fast test tier launches no process (mark the test "
                                   f"@pytest.mark.slow): {argv!r}")
            super().__init__(args, *a, **k)

    monkeypatch.setattr(subprocess, "Popen", NoLaunch)
    yield


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """`make test` runs on two workers; the tests that launch DeepSpeed (fixed master ports, the CPU all-reduce's
    /dev/shm workspace checked before and after) all go to one of them."""
    import inspect
    for item in items:
        fn = getattr(item, "function", None)
        try:
            src = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            src = ""
        if "launcher=DS" in src or '"deepspeed"), "--num_gpus"' in src or "_shm_buffers(" in src:
            item.add_marker(pytest.mark.xdist_group("deepspeed"))
