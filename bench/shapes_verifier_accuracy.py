"""Verifier figures for the README: strict accuracy per category on ground-truth renders of every prompt (5 images
each) and on images rendered for a different prompt of the same category. `python bench/shapes_verifier_accuracy.py`"""
import numpy as np

from densegrpo_fast.prompts.shapes import CATEGORIES, all_prompts
from densegrpo_fast.pretrain.render import random_prompt_like, render_batch
from densegrpo_fast.rewards.shapes_verifier import ShapesVerifier

if __name__ == "__main__":
    ps = all_prompts()
    prompts = [ps[i % len(ps)] for i in range(len(ps) * 5)]
    imgs = render_batch(prompts, seed=7)
    v = ShapesVerifier({p.text: p for p in ps})
    _, own = v(imgs, [p.text for p in prompts])
    rng = np.random.default_rng(1)
    _, other = v(imgs, [random_prompt_like(p, rng, ps).text for p in prompts])
    print("| category | images | strict on its own prompt | strict on another prompt |\n|---|---|---|---|")
    for c in CATEGORIES:
        m = np.array([p.category == c for p in prompts])
        print(f"| {c} | {m.sum()} | {own[m].mean():.3f} | {other[m].mean():.3f} |")
