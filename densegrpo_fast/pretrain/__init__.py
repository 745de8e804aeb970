"""`densegrpo pretrain`: the embedded default model, trained from scratch on rendered shapes.

1. VAE (AutoencoderKL, 64 px -> 4x16x16): MSE reconstruction + small KL, on rendered train-split images (every
   image here is drawn category-balanced: the six categories equally often).
2. Latent statistics -> the VAE's shift_factor / scaling_factor (SD3 convention: z = (latent - shift) * scale).
3. Flow matching for the MMDiT and both CLIP text encoders: x_s = (1 - s) x0 + s eps, target v = eps - x0,
   s ~ logit-normal (SD3), 10 % of captions dropped to "" for CFG; EMA of the weights is what ships.
The folder is a diffusers StableDiffusion3Pipeline and loads through `SD3Family.from_pretrained` (models/sd3.py).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict

import numpy as np
import torch

from ..config import TinyModelConfig
from ..prompts import vocabulary
from ..prompts.shapes import SPLITS, load_split
from .render import render_batch

DEFAULT_SPEC = TinyModelConfig(resolution=64, latent_channels=4, vae_block_channels=[16, 32, 32], num_layers=4,
                               num_attention_heads=4, attention_head_dim=32, text_hidden=64, text_layers=2,
                               tokenizer_max_length=16)


def _images(prompts, seed):
    x = torch.from_numpy(render_batch(prompts, seed)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x


def _log(msg):
    print(msg, flush=True)


def pretrain(out: str, vae_steps: int = 1200, dit_steps: int = 4000, batch: int = 32, seed: int = 0,
             lr: float = 5e-4, threads: int = 0, spec: TinyModelConfig = DEFAULT_SPEC, n_data: int = 16384,
             init: str | None = None) -> dict:
    """init: continue from a folder written by an earlier pretrain (its VAE is kept: vae_steps is ignored)."""
    from ..models.base import PromptEncoder
    from ..models.sd3 import SD3Family, build_tiny_sd3
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    prompts = load_split("train")
    words = vocabulary([p.text for s in SPLITS for p in load_split(s)])  # the tokenizer knows every word
    # images are drawn category-balanced: each of the six categories 1/6 of the data, whatever its prompt count
    cats = [p.category for p in prompts]
    weight = np.array([1.0 / cats.count(c) for c in cats])
    weight /= weight.sum()
    work = out + ".tmp"
    shutil.rmtree(work, ignore_errors=True)
    if init is not None:
        shutil.copytree(init, work)
        vae_steps = 0
    else:
        build_tiny_sd3(work, words, spec, seed=seed)
    pipe = SD3Family().from_pretrained(work)
    vae, tr = pipe.vae, pipe.transformer
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    log = {"spec": asdict(spec), "vae_steps": vae_steps, "dit_steps": dit_steps, "batch": batch, "seed": seed,
           "init": init, "lr": lr}
    if init is not None:
        with open(os.path.join(init, "pretrain.json")) as f:
            log["init_log"] = json.load(f)

    # ------------------------------------------------------------------ 1. VAE
    old_shift, old_scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(vae_steps):
        ps = [prompts[i] for i in rng.choice(len(prompts), size=16, p=weight)]
        x = _images(ps, seed * 1_000_003 + step)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (rec - x).pow(2).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == vae_steps - 1:
            _log(f"vae {step}/{vae_steps}: mse {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
    if vae_steps:
        log["vae_final_loss"] = loss.item()
    vae.eval().requires_grad_(False)

    # ------------------------------------------------------------------ 2. latent data set and statistics
    # n_data rendered images encoded once (the posterior mean): rendering + encoding every step cost ~35 % more.
    data_idx = rng.choice(len(prompts), size=n_data, p=weight)
    with torch.no_grad():
        lat = torch.cat([vae.encode(_images([prompts[j] for j in data_idx[i:i + 256]], 10 ** 9 + seed + i))
                         .latent_dist.mean for i in range(0, n_data, 256)])
    shift, scale = lat.mean().item(), 1.0 / lat.std().item()
    if init is not None:  # keep the statistics the transformer was trained with
        shift, scale = old_shift, old_scale
    lat = (lat - shift) * scale
    _log(f"encoded {n_data} latents ({time.perf_counter() - t0:.0f}s)")
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    log.update(latent_shift=shift, latent_scale=scale)

    # ------------------------------------------------------------------ 3. flow matching (MMDiT + text encoders)
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    for m in [tr] + encoders:
        m.train().requires_grad_(True)
    params = list(tr.parameters()) + [p for e in encoders for p in e.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    ema = copy.deepcopy([tr] + encoders)
    texts_all = [p.text for p in prompts]
    enc = PromptEncoder(pipe, 4, torch.device("cpu"), torch.float32, SD3Family())
    for step in range(dit_steps):
        rows = rng.integers(n_data, size=batch)
        x0 = lat[rows]
        texts = [texts_all[data_idx[r]] if rng.random() > 0.1 else "" for r in rows]
        c = enc.encode_with_grad(texts)
        pe, pooled = c.embeds, c.pooled
        s = torch.sigmoid(torch.randn(batch, generator=torch.Generator().manual_seed(step)))
        eps = torch.randn_like(x0)
        xs = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * eps
        v = tr(hidden_states=xs, timestep=s * 1000, encoder_hidden_states=pe, pooled_projections=pooled).sample
        loss = (v - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        d = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for m_ema, m in zip(ema, [tr] + encoders):
                for pe_, p in zip(m_ema.parameters(), m.parameters()):
                    pe_.mul_(d).add_(p.detach(), alpha=1 - d)
        if step % 250 == 0 or step == dit_steps - 1:
            _log(f"dit {step}/{dit_steps}: fm loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
    log["dit_final_loss"] = loss.item()
    log["seconds"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ save the EMA weights
    pipe.transformer, pipe.text_encoder, pipe.text_encoder_2 = ema
    for m in ema:
        m.eval().requires_grad_(False)
    pipe.register_modules(transformer=ema[0], text_encoder=ema[1], text_encoder_2=ema[2])
    shutil.rmtree(out, ignore_errors=True)
    pipe.save_pretrained(out)
    shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(out, "pretrain.json"), "w") as f:
        json.dump(log, f, indent=1)
    return log
