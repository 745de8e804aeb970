"""Verifier figures for the README: strict accuracy per category on ground-truth renders of every prompt (5 images
each, 7,400 in all), on the same images checked against a prompt of the same category asking for a different scene,
and on the renders after a round trip through the shipped model's VAE (the best a generator with that VAE can draw:
corners round off). `python bench/shapes_verifier_accuracy.py`"""
import numpy as np
import torch

from densegrpo_fast.eval import DEFAULT_MODEL
from densegrpo_fast.prompts.shapes import CATEGORIES, all_prompts
from densegrpo_fast.pretrain.render import random_prompt_like, render_batch
from densegrpo_fast.rewards.shapes_verifier import ShapesVerifier


@torch.no_grad()
def vae_round_trip(imgs: np.ndarray) -> torch.Tensor:
    from densegrpo_fast.models import load_pipeline
    vae = load_pipeline(DEFAULT_MODEL, "sd3", torch.float32).vae
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = [vae.decode(vae.encode(x[i:i + 256]).latent_dist.mean).sample for i in range(0, len(x), 256)]
    return (torch.cat(out).clamp(-1, 1) + 1) / 2


if __name__ == "__main__":
    ps = all_prompts()
    prompts = [ps[i % len(ps)] for i in range(len(ps) * 5)]
    imgs = render_batch(prompts, seed=7)
    v = ShapesVerifier({p.text: p for p in ps})
    texts = [p.text for p in prompts]
    _, own = v(imgs, texts)
    rng = np.random.default_rng(1)
    _, other = v(imgs, [random_prompt_like(p, rng, ps).text for p in prompts])
    _, vae = v(vae_round_trip(imgs), texts)
    print("| category | images | strict, own prompt | strict, another scene's prompt | own prompt, after the VAE |\n"
          "|---|---|---|---|---|")
    for c in CATEGORIES:
        m = np.array([p.category == c for p in prompts])
        print(f"| {c} | {m.sum()} | {own[m].mean():.3f} | {other[m].mean():.3f} | {vae[m].mean():.3f} |")
