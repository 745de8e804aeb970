"""The compile caches' folder: keyed by torch version and the transformer's config, set before compiling."""
import os

import torch
from diffusers import SD3Transformer2DModel

from densegrpo_fast.models.base import compile_cache_dir, compile_transformer


def _tiny(layers=1):
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)


def test_cache_folder_is_keyed_by_model_and_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEGRPO_COMPILE_CACHE", str(tmp_path))
    a, b = compile_cache_dir(_tiny(1)), compile_cache_dir(_tiny(2))
    assert a != b and a == compile_cache_dir(_tiny(1))
    assert os.path.dirname(a) == os.path.join(str(tmp_path), f"torch-{torch.__version__}")


def test_compile_points_inductor_at_the_cache_unless_told_otherwise(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config
    monkeypatch.setenv("DENSEGRPO_COMPILE_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    m = _tiny()
    compile_transformer(m, "off")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # off: nothing changes
    compile_transformer(m, "default")                 # lazy: compiles at the first forward
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == compile_cache_dir(m) and inductor_config.fx_graph_cache
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compile_transformer(_tiny(), "default")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
