"""The shapes benchmark: prompt grammar and splits, the verifier on rendered images (both directions), and the
shipped base model through the SD3 code path."""
import collections
import json
import os

import numpy as np
import pytest
import torch

from densegrpo_fast.prompts.shapes import (ASSET_DIR, CATEGORIES, COLORS, SHAPES, SPLITS, TEST_PER_CATEGORY,
                                           VALIDATION_PER_CATEGORY, all_prompts, load_split, make_splits, scenes)
from densegrpo_fast.pretrain.render import random_prompt_like, render, render_batch
from densegrpo_fast.rewards.shapes_verifier import ShapesVerifier, detect, score


def test_grammar_covers_the_six_categories():
    ps = all_prompts()
    cats = collections.Counter(p.category for p in ps)
    assert set(cats) == set(CATEGORIES)
    assert len(COLORS) >= 7 and len(SHAPES) >= 5
    assert len(ps) >= 1000
    texts = [p.text for p in ps]
    assert len(texts) == len(set(texts))
    assert len(scenes()) == len({repr(sc) for sc in scenes()})   # no scene twice
    assert "a photo of a diamond" in texts and "a cyan rectangle and an orange diamond" in texts
    assert not any(" a orange" in f" {t}" for t in texts)
    assert max(len(t.split()) for t in texts) + 2 <= 16    # BOS + one token a word + EOS fit the tokenizer
    assert "three triangles" in texts and "one circle" in texts
    assert "a red circle and a blue square" in texts and "a circle left of a square" in texts
    # unordered pairs only: the two orders of one scene would be two prompts with the same meaning
    assert "a square and a circle" not in texts
    counting = [p for p in ps if p.category == "counting"]
    assert sorted({p.count for p in counting}) == [1, 2, 3, 4]


def test_shipped_splits_are_disjoint_balanced_and_reproducible():
    split = {s: load_split(s) for s in SPLITS}
    texts = {s: {p.text for p in ps} for s, ps in split.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    assert sum(map(len, texts.values())) == len(all_prompts())
    for s, n in (("test", TEST_PER_CATEGORY), ("validation", VALIDATION_PER_CATEGORY)):
        assert n >= (40 if s == "test" else 20)
        assert collections.Counter(p.category for p in split[s]) == {c: n for c in CATEGORIES}
        # round-robin order: a prefix of 6 k prompts holds k of every category
        assert collections.Counter(p.category for p in split[s][:60]) == {c: 10 for c in CATEGORIES}
    assert {p.category for p in split["train"]} == set(CATEGORIES)
    fresh = make_splits(json.load(open(os.path.join(ASSET_DIR, "meta.json")))["seed"])
    for s in SPLITS:
        assert [p.text for p in fresh[s]] == [p.text for p in split[s]]


@pytest.fixture(scope="module")
def rendered():
    """Every scene 8 times in random phrasings (~4,500 images, every category >= 800)."""
    ps = all_prompts()
    rng = np.random.default_rng(5)
    prompts = [ps[i] for i in rng.integers(len(ps), size=4500)]
    sc = scenes()
    by_cat = {c: [p for p in sc if p.category == c] for c in CATEGORIES}
    prompts += [p for c in ("single_object", "two_object", "counting", "colors") for p in by_cat[c] * 8]
    return prompts, render_batch(prompts, seed=2024)


def test_verifier_accepts_ground_truth(rendered):
    prompts, imgs = rendered
    v = ShapesVerifier({p.text: p for p in all_prompts()})
    part, strict = v(imgs, [p.text for p in prompts])
    for c in CATEGORIES:
        m = np.array([p.category == c for p in prompts])
        assert strict[m].mean() >= 0.98, (c, strict[m].mean())
        assert part[m].mean() >= 0.98
    for s in SHAPES:  # every shape, alone: the verifier names it
        m = np.array([p.category == "single_object" and p.objs()[0].shape == s for p in prompts])
        assert m.sum() >= 8 and strict[m].mean() >= 0.98, s


def test_verifier_rejects_images_of_another_prompt(rendered):
    prompts, imgs = rendered
    ps = all_prompts()
    rng = np.random.default_rng(0)
    others = [random_prompt_like(p, rng, ps) for p in prompts]
    _, strict = ShapesVerifier({p.text: p for p in ps})(imgs, [p.text for p in others])
    for c in CATEGORIES:
        m = np.array([p.category == c for p in prompts])
        assert strict[m].mean() <= 0.10, (c, strict[m].mean())
    for s in SHAPES:  # a drawn shape is never taken for another one
        m = np.array([p.category == "single_object" and p.objs()[0].shape == s for p in prompts])
        assert strict[m].mean() <= 0.02, s


def test_verifier_partial_credit_by_hand():
    p = next(x for x in all_prompts() if x.text == "three circles")
    img = render(next(x for x in all_prompts() if x.text == "two circles"), np.random.default_rng(0))
    part, strict = score(p, detect(img[None])[0])
    assert not strict and abs(part - (1 - 1 / 3)) < 1e-9  # 2 of 3 circles: 1 - |2 - 3| / 3
    blank = np.full((1, 64, 64, 3), 30, dtype=np.uint8)
    assert score(p, detect(blank)[0]) == (0.0, False)
    with pytest.raises(KeyError, match="not in the shapes benchmark"):
        ShapesVerifier()(blank, ["a teapot"])


def test_verifier_is_deterministic_and_batched(rendered):
    prompts, imgs = rendered
    v = ShapesVerifier({p.text: p for p in all_prompts()})
    a = v(imgs[:20], [p.text for p in prompts[:20]])
    b = [v(imgs[i:i + 1], [prompts[i].text]) for i in range(20)]
    assert np.array_equal(a[0], np.concatenate([x[0] for x in b]))
    t = torch.from_numpy(imgs[:20]).permute(0, 3, 1, 2).float() / 255
    assert np.array_equal(v(t, [p.text for p in prompts[:20]])[1], a[1])


SHIPPED = os.path.join(os.path.dirname(ASSET_DIR), "shapes_sd3_tiny")


@pytest.mark.skipif(not os.path.isdir(SHIPPED), reason="shipped model not built")
def test_shipped_model_loads_through_the_sd3_path_and_draws_shapes():
    from densegrpo_fast.eval import generate
    from densegrpo_fast.models import load_pipeline
    from densegrpo_fast.models.base import Models, PromptEncoder
    from densegrpo_fast.models.sd3 import SD3Family
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(SHIPPED) for f in fs)
    assert size <= 25 * 2 ** 20
    pipe = load_pipeline(SHIPPED, "sd3", torch.float32)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    text = PromptEncoder(pipe, 4, torch.device("cpu"), torch.float32, SD3Family())
    m = Models(pipe, pipe.transformer, pipe.vae, text, (4, 16, 16), torch.float32, SD3Family())
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    from densegrpo_fast.rollout.schedule import flow_sigmas
    imgs = generate(pipe.transformer, text, m.decode, (4, 16, 16), prompts, [(i, 0) for i in range(4)],
                    flow_sigmas(20, 3.0), 4.5, 0, "cpu", m.family)
    assert imgs.shape == (4, 3, 64, 64)
    # samples are visibly shapes: the verifier finds at least one object in most of them
    dets = detect((imgs.permute(0, 2, 3, 1) * 255).round().byte().numpy())
    assert sum(len(d) > 0 for d in dets) >= 3


def test_tiny_tokenizer_spells_every_word_as_one_token(tmp_path):
    """The tiny models' BPE tokenizer: every grammar word is one token (the earlier prefix-merge tokenizer split
    "triangle" into six tokens after "and"'s a+n merge, and long prompts were cut at 16 tokens), so every prompt fits
    the shipped tokenizer's 16 tokens with room to spare."""
    from transformers import CLIPTokenizer
    from densegrpo_fast.models.tokenizers import write_clip_tokenizer
    from densegrpo_fast.prompts import vocabulary
    texts = [p.text for p in all_prompts()]
    words = vocabulary(texts) + ["an", "and", "banana", "nan", "ana"]
    write_clip_tokenizer(str(tmp_path), words, 16)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    for w in words:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    shipped = CLIPTokenizer.from_pretrained(os.path.join(SHIPPED, "tokenizer"))
    for t in texts:
        ids = shipped(t).input_ids
        assert len(ids) == len(t.split()) + 2 <= 16, t
