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


def test_compile_auto_follows_the_break_even_rule(tmp_path, monkeypatch):
    """model.compile=auto: on at run.epochs >= the break-even for the cache's state (cold, then warm once an earlier
    run left graphs in this transformer's cache folder), off below it, under a wall-clock budget and with ZeRO-3;
    an explicit mode is kept; ranks agree on cold if any rank is cold."""
    from diffusers import SD3Transformer2DModel
    from densegrpo_fast.models.base import COMPILE_BREAK_EVEN_EPOCHS as BE, compile_cache_dir, resolve_compile
    monkeypatch.setenv("DENSEGRPO_COMPILE_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                               pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
    assert BE["warm"] < BE["cold"]
    assert resolve_compile("auto", tr, BE["cold"])[0] == "default"
    assert resolve_compile("auto", tr, BE["cold"] - 1)[0] == "off"
    assert resolve_compile("auto", tr, 10 ** 6, budget_s=300.0)[0] == "off"
    assert resolve_compile("auto", tr, 10 ** 6, zero_stage=3)[0] == "off"
    assert resolve_compile("off", tr, 10 ** 6) == ("off", "set")
    assert resolve_compile("max-autotune", tr, 1)[0] == "max-autotune"
    # an earlier run compiled this transformer: the warm break-even applies
    d = compile_cache_dir(tr)
    os.makedirs(os.path.join(d, "fxgraph"), exist_ok=True)
    open(os.path.join(d, "fxgraph", "entry"), "w").write("x")
    mode, why = resolve_compile("auto", tr, BE["warm"])
    assert mode == "default" and "warm" in why
    assert resolve_compile("auto", tr, BE["warm"] - 1)[0] == "off"
    # another rank is cold: every rank uses the cold break-even
    assert resolve_compile("auto", tr, BE["warm"], agree_cold=lambda cold: True)[0] == "off"


def test_torch_default_cache_folder_does_not_make_auto_warm(tmp_path, monkeypatch):
    """torch writes its default folder into TORCHINDUCTOR_CACHE_DIR once anything compiles; graphs of other models
    there must not make this transformer's cache look warm (its own folder is empty: the cold break-even holds)."""
    from densegrpo_fast.models.base import COMPILE_BREAK_EVEN_EPOCHS as BE, compile_cache_is_warm, resolve_compile
    monkeypatch.setenv("DENSEGRPO_COMPILE_CACHE", str(tmp_path / "ours"))
    other = tmp_path / "torch_default"
    os.makedirs(other / "fxgraph")
    (other / "fxgraph" / "entry").write_text("x")
    monkeypatch.setattr("torch._inductor.runtime.cache_dir_utils.default_cache_dir", lambda: str(other))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(other))
    tr = _tiny()
    assert not compile_cache_is_warm(tr)
    assert resolve_compile("auto", tr, BE["warm"])[0] == "off"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own folder is used as is
    os.makedirs(tmp_path / "mine" / "fxgraph")
    (tmp_path / "mine" / "fxgraph" / "entry").write_text("x")
    assert compile_cache_is_warm(tr)
