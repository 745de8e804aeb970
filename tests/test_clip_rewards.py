"""CLIP-family rewards on a tiny random CLIP saved as a local folder and loaded through the same path as a real
checkpoint: scores against a plain transformers computation in fp64, batching and dtype invariance, clear errors."""

import pytest
import torch

from densegrpo_fast.rewards import CombinedReward, RewardError
from densegrpo_fast.rewards.clip import CLIP_MEAN, CLIP_STD, ClipEmbedder

WORDS = ["a", "red", "blue", "green", "circle", "square", "photo", "of"]
PROMPTS = ["a red circle", "a blue square", "a photo of a green circle", "blue", "a red square"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from conftest import build_tiny_clip
    return build_tiny_clip(str(tmp_path_factory.mktemp("clip") / "clip"), WORDS)


def _images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _reference(folder, images, prompts):
    """Plain transformers in fp64: CLIPModel.forward's logits_per_image on hand-normalised 32x32 pixels."""
    from transformers import CLIPModel, CLIPTokenizer
    m = CLIPModel.from_pretrained(folder).double().eval()
    tok = CLIPTokenizer.from_pretrained(folder)
    t = tok(prompts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    px = (images.double() - torch.tensor(CLIP_MEAN).double().view(1, 3, 1, 1)) / \
        torch.tensor(CLIP_STD).double().view(1, 3, 1, 1)
    with torch.no_grad():
        out = m(input_ids=t.input_ids, attention_mask=t.attention_mask, pixel_values=px)
    return out.logits_per_image.diagonal(), out.image_embeds, out.text_embeds


def test_pickscore_and_clip_score_match_transformers(clip_dir):
    imgs = _images(5)
    logits, ie, te = _reference(clip_dir, imgs, PROMPTS)
    r = CombinedReward({}, components={"pickscore": {"weight": 1.0, "path": clip_dir, "batch_size": 2},
                                       "clip_score": {"weight": 0.0, "path": clip_dir, "batch_size": 3}})
    _, parts = r(imgs, PROMPTS)
    torch.testing.assert_close(parts["pickscore"].double(), logits / 26.0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["clip_score"].double(), (ie * te).sum(-1), rtol=1e-5, atol=1e-6)
    assert parts["clip_score"].abs().max() <= 1.0


def test_batching_dtype_and_resizing(clip_dir):
    imgs = _images(5, seed=1)
    full = ClipEmbedder(clip_dir, "cpu", "float32", batch_size=5).image_embeds(imgs)
    one = ClipEmbedder(clip_dir, "cpu", "float32", batch_size=1).image_embeds(imgs)
    torch.testing.assert_close(one, full, rtol=1e-5, atol=1e-6)
    bf = ClipEmbedder(clip_dir, "cpu", "bfloat16", batch_size=2).image_embeds(imgs)
    assert (bf - full).abs().max() < 5e-2
    emb = ClipEmbedder(clip_dir, "cpu")
    x = emb.preprocess(torch.rand(2, 3, 48, 64))       # shortest side 48 -> 32, then a centred 32x32 crop
    assert x.shape == (2, 3, 32, 32)
    big = torch.nn.functional.interpolate(imgs, scale_factor=2, mode="nearest")  # the same picture at 64 px
    assert (emb.image_embeds(big) - full).abs().max() < 0.1


def test_aesthetic_head_linear_and_mlp(clip_dir, tmp_path):
    from safetensors.torch import save_file
    imgs = _images(3, seed=2)
    _, ie, _ = _reference(clip_dir, imgs, ["a"] * 3)
    g = torch.Generator().manual_seed(3)
    mlp = {"layers.0.weight": torch.randn(8, 16, generator=g), "layers.0.bias": torch.randn(8, generator=g),
           "layers.2.weight": torch.randn(1, 8, generator=g), "layers.2.bias": torch.randn(1, generator=g)}
    save_file(mlp, str(tmp_path / "head.safetensors"))
    r = CombinedReward({}, components={"aesthetic": {"weight": 1.0, "path": clip_dir,
                                                     "head": str(tmp_path / "head.safetensors")}})
    got, _ = r(imgs, ["x"] * 3)
    h = ie @ mlp["layers.0.weight"].double().T + mlp["layers.0.bias"].double()  # Linear stack, no activation
    want = (h @ mlp["layers.2.weight"].double().T + mlp["layers.2.bias"].double()).squeeze(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.save({"weight": torch.randn(1, 12), "bias": torch.zeros(1)}, str(tmp_path / "bad.pth"))
    with pytest.raises(RewardError, match=r"head '.*bad.pth' maps 12 -> 1, but the CLIP image embedding has 16"):
        CombinedReward({}, components={"aesthetic": {"weight": 1.0, "path": clip_dir,
                                                     "head": str(tmp_path / "bad.pth")}})


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(RewardError, match=r"model folder '.*nope' does not exist"):
        CombinedReward({}, components={"pickscore": {"weight": 1.0, "path": str(tmp_path / "nope")}})
