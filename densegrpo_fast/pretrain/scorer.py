"""`densegrpo train-scorer`: a learned reward for the shapes world, a tiny CLIP trained from scratch.

The scorer is a transformers `CLIPModel` (ViT on 64 px images in 8 px patches, a small text transformer), a
tokenizer that spells every word of the prompt grammar as one token (models.tokenizers.write_clip_tokenizer) and a
preprocessor config, saved with save_pretrained: it loads through the `clip_score` / `pickscore` rewards like any
CLIP folder (reward.components.clip_score.path).

Training (deterministic per seed on one thread): each step draws `batch` train-split prompts (categories equally
often), renders one scene for each (pretrain/render.py), half of them passed through the shipped base model's VAE
(encode, decode: the blur and colour shifts of generated images), and scores each image against
  - every caption of the batch (in-batch negatives), except those that also hold for the image (a "circle" caption
    for another image of a circle): masked, never pushed apart;
  - `hard` hard-negative captions of its own, in the same phrasing: a wrong colour, count, shape or relation, or the
    two objects' colours swapped (`hard_negatives`), each checked false on the scene drawn;
with the symmetric InfoNCE loss (image -> captions over the batch plus its hard negatives, caption -> images over
the batch). Whether a caption holds for a scene is the verifier's own rule (rewards/shapes_verifier.score) applied
to the objects as drawn, so labels are exact.

`scorer_figures` measures the shipped folder: how often the true caption outranks each kind of hard negative on
rendered test-split scenes and on the base model's samples, and the rank correlation of the scorer with the
verifier's partial score on those samples.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..prompts import vocabulary
from ..prompts.shapes import (COLORS, NUMBERS, RELATIONS, SHAPES, SPLITS, TEMPLATES, Obj, ShapesPrompt, a,
                              load_split, plural)

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "shapes_scorer")
BASE_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "shapes_sd3_tiny")
KINDS = ("colour", "count", "shape", "relation", "swap")
MAX_TEXT = 16
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


# ------------------------------------------------------------------------------------------ captions and negatives

def scene_text(p: ShapesPrompt) -> str:
    """The bare phrasing of a spec, as prompts.shapes.scenes() writes it."""
    o = p.objs()
    if p.category == "single_object":
        return f"a {o[0].shape}"
    if p.category == "two_object":
        return f"a {o[0].shape} and a {o[1].shape}"
    if p.category == "counting":
        return f"{NUMBERS[p.count - 1]} {o[0].shape if p.count == 1 else plural(o[0].shape)}"
    if p.category == "colors":
        return f"{a(o[0].color)} {o[0].shape}"
    if p.category == "position":
        return f"a {o[0].shape} {p.relation} a {o[1].shape}"
    if p.category == "color_attr":
        return f"{a(o[0].color)} {o[0].shape} and {a(o[1].color)} {o[1].shape}"
    raise ValueError(p.category)


def template_of(p: ShapesPrompt) -> str:
    """The phrasing ("a photo of {x}", ...) of a prompt; the bare "{x}" when no other fits."""
    x = scene_text(p)
    for t in sorted(TEMPLATES, key=len, reverse=True):
        if t.format(x=x) == p.text:
            return t
    return "{x}"


def _spec(p: ShapesPrompt, objects, count=None, relation=None, template="{x}") -> ShapesPrompt:
    q = ShapesPrompt("", p.category, [Obj(*o) for o in objects], p.count if count is None else count,
                     p.relation if relation is None else relation)
    q.text = template.format(x=scene_text(q))
    return q


def hard_negatives(p: ShapesPrompt) -> dict[str, list[ShapesPrompt]]:
    """Every hard negative of a prompt by kind, in its phrasing: a wrong colour (colours named), a wrong count
    (counting), a wrong shape (every category), a wrong relation (position: the other three relations and the
    objects swapped), the two colours swapped (color_attr). Falsity on a given scene is checked by the caller."""
    t = template_of(p)
    o = [(x.shape, x.color) for x in p.objs()]
    out: dict[str, list[ShapesPrompt]] = {k: [] for k in KINDS}
    for i, (s, c) in enumerate(o):
        others = {x[0] for j, x in enumerate(o) if j != i}
        for s2 in SHAPES:
            if s2 != s and s2 not in others:
                out["shape"].append(_spec(p, [x if j != i else (s2, c) for j, x in enumerate(o)], template=t))
        if c is not None:
            for c2 in COLORS:
                if c2 != c and not (len(o) == 2 and c2 == o[1 - i][1]):   # a colour swap is its own kind
                    out["colour"].append(_spec(p, [x if j != i else (s, c2) for j, x in enumerate(o)], template=t))
    if p.category == "counting":
        out["count"] = [_spec(p, o, count=n, template=t) for n in range(1, 5) if n != p.count]
    if p.category == "position":
        out["relation"] = [_spec(p, o, relation=r, template=t) for r in RELATIONS if r != p.relation]
        out["relation"].append(_spec(p, o[::-1], template=t))
    if p.category == "color_attr":
        out["swap"] = [_spec(p, [(o[0][0], o[1][1]), (o[1][0], o[0][1])], template=t)]
    return out


def layout_detections(placed) -> list:
    """The objects as drawn, as the verifier's detections (so its rules decide what a scene satisfies)."""
    from ..rewards.shapes_verifier import Detection
    return [Detection(s, c, cx, cy, int(math.pi * r * r)) for s, c, cx, cy, r in placed]


def holds(p: ShapesPrompt, dets) -> bool:
    from ..rewards.shapes_verifier import score
    return bool(score(p, dets)[1])


# ------------------------------------------------------------------------------------------ model, tokenizer

def scorer_words() -> list[str]:
    return vocabulary([p.text for s in SPLITS for p in load_split(s)] + [" ".join(NUMBERS + SHAPES + COLORS)])


def build_scorer(seed: int, vision_hidden: int = 96, vision_layers: int = 4, text_hidden: int = 64,
                 text_layers: int = 2, projection_dim: int = 64, work: Optional[str] = None):
    """-> (CLIPModel, tokenizer), randomly initialised with `seed`; the tokenizer is written locally."""
    import tempfile
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from ..models.tokenizers import write_clip_tokenizer
    tmp = work or tempfile.mkdtemp(prefix="scorer_tok_")
    write_clip_tokenizer(tmp, scorer_words(), MAX_TEXT)
    tok = CLIPTokenizer.from_pretrained(tmp)
    if work is None:
        shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok.get_vocab()), hidden_size=text_hidden, intermediate_size=4 * text_hidden,
                         num_hidden_layers=text_layers, num_attention_heads=2, max_position_embeddings=MAX_TEXT,
                         **ids),
        vision_config=dict(image_size=64, patch_size=8, hidden_size=vision_hidden,
                           intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                           num_attention_heads=4),
        projection_dim=projection_dim, **ids)
    return CLIPModel(cfg), tok


def write_preprocessor(folder: str) -> None:
    """What ClipEmbedder (and CLIPImageProcessor) read: no resize at 64 px, CLIP's mean and std."""
    cfg = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 64},
           "resample": 3, "do_center_crop": True, "crop_size": {"height": 64, "width": 64}, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
           "image_std": list(CLIP_STD), "do_convert_rgb": True}
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def _feat(e):
    return e if torch.is_tensor(e) else e.pooler_output


def normalise_images(x: torch.Tensor) -> torch.Tensor:
    """(B,3,64,64) in [0,1] -> CLIP-normalised (as ClipEmbedder.preprocess does at 64 px)."""
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


class _Tok:
    """Tokenised captions, cached (the grammar has a few thousand)."""

    def __init__(self, tok):
        self.tok, self.cache = tok, {}

    def __call__(self, texts):
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            enc = self.tok(new, padding="max_length", truncation=True, max_length=MAX_TEXT, return_tensors="pt")
            for i, t in enumerate(new):
                self.cache[t] = (enc.input_ids[i], enc.attention_mask[i])
        return (torch.stack([self.cache[t][0] for t in texts]), torch.stack([self.cache[t][1] for t in texts]))


# ------------------------------------------------------------------------------------------ data

def _balanced(prompts):
    cats = [p.category for p in prompts]
    w = np.array([1.0 / cats.count(c) for c in cats])
    return w / w.sum()


def _render(ps, rng):
    from .render import render_with_layout
    imgs, dets = [], []
    for p in ps:
        im, placed = render_with_layout(p, rng)
        imgs.append(im)
        dets.append(layout_detections(placed))
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0, dets


@torch.no_grad()
def vae_pool(prompts, n: int, seed: int, vae_path: str):
    """n rendered scenes passed through the base model's VAE (posterior mean, decoded) -> images in [0,1], the
    prompt of each, and each scene's drawn objects."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(vae_path).eval()
    rng = np.random.default_rng([seed, 7_000_003])
    idx = rng.choice(len(prompts), size=n, p=_balanced(prompts))
    imgs, dets = [], []
    for s in range(0, n, 64):
        x, d = _render([prompts[i] for i in idx[s:s + 64]], rng)
        rec = vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample
        imgs.append(((rec + 1) / 2).clamp(0, 1))
        dets += d
    return torch.cat(imgs), [prompts[i] for i in idx], dets


def negatives_for(p: ShapesPrompt, dets, rng, k: int, pool) -> list[str]:
    """k hard-negative captions false on the scene: a kind drawn uniformly among those the prompt has, then one of
    its captions; a random false caption of the same category where none is left."""
    by_kind = {kd: [q for q in v if not holds(q, dets)] for kd, v in hard_negatives(p).items()}
    by_kind = {kd: v for kd, v in by_kind.items() if v}
    out = []
    for _ in range(k):
        if by_kind:
            kinds = sorted(by_kind)
            v = by_kind[kinds[rng.integers(len(kinds))]]
            out.append(v[rng.integers(len(v))].text)
        else:
            for _ in range(50):
                q = pool[rng.integers(len(pool))]
                if not holds(q, dets):
                    break
            out.append(q.text)
    return out


# ------------------------------------------------------------------------------------------ training

def train_scorer(out: str, seed: int = 0, steps: int = 3000, batch: int = 48, hard: int = 3, lr: float = 1e-3,
                 vae_fraction: float = 0.5, pool_size: int = 4096, threads: int = 1, log_every: int = 100,
                 ckpt_every: int = 250, vae_path: Optional[str] = None) -> dict:
    """Train the scorer and save it to `out` (resumes from `out`.ckpt when that exists). -> the training log."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    vae_path = vae_path or os.path.join(BASE_MODEL, "vae")
    prompts = load_split("train")
    weight = _balanced(prompts)
    model, tok = build_scorer(seed)
    toks = _Tok(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    ckpt = out + ".ckpt"
    start, prior_seconds, history = 0, 0.0, []
    if os.path.isfile(os.path.join(ckpt, "state.pt")):
        st = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start, prior_seconds, history = st["step"], st["seconds"], st["history"]
        print(f"resumed from {ckpt} at step {start}", flush=True)
    n_pool = int(round(batch * vae_fraction))
    pool = vae_pool(prompts, pool_size, seed, vae_path) if n_pool else None
    model.train()
    for step in range(start, steps):
        rng = np.random.default_rng([seed, step])
        ps = [prompts[i] for i in rng.choice(len(prompts), size=batch - n_pool, p=weight)]
        x, dets = _render(ps, rng)
        if n_pool:
            j = rng.integers(len(pool[1]), size=n_pool)
            x = torch.cat([x, pool[0][torch.from_numpy(j)]])
            ps += [pool[1][i] for i in j]
            dets += [pool[2][i] for i in j]
        caps = [p.text for p in ps]
        true = torch.tensor([[holds(q, d) for q in ps] for d in dets])          # (image, caption) holds
        negs = [c for p, d in zip(ps, dets) for c in negatives_for(p, d, rng, hard, prompts)]
        ids, att = toks(caps + negs)
        ie = F.normalize(_feat(model.get_image_features(pixel_values=normalise_images(x))), dim=-1)
        te = F.normalize(_feat(model.get_text_features(input_ids=ids, attention_mask=att)), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100.0)
        pos, neg = te[:batch], te[batch:].view(batch, hard, -1)
        mask = true & ~torch.eye(batch, dtype=torch.bool)                      # other captions that also hold
        l_in = (scale * ie @ pos.T).masked_fill(mask, float("-inf"))
        l_hard = scale * torch.einsum("bd,bkd->bk", ie, neg)
        tgt = torch.arange(batch)
        loss_i = F.cross_entropy(torch.cat([l_in, l_hard], 1), tgt)
        loss_t = F.cross_entropy((scale * pos @ ie.T).masked_fill(mask.T, float("-inf")), tgt)
        loss = 0.5 * (loss_i + loss_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            hard_acc = (l_in.diagonal()[:, None] > l_hard).float().mean().item()
        if step % log_every == 0 or step == steps - 1:
            sec = prior_seconds + time.perf_counter() - t0
            history.append({"step": step, "loss": round(loss.item(), 4), "hard_acc": round(hard_acc, 3),
                            "scale": round(scale.item(), 2), "seconds": round(sec, 1)})
            print(f"scorer {step}/{steps}: loss {loss.item():.3f}, true > hard negative {hard_acc:.2f}, "
                  f"scale {scale.item():.1f} ({sec:.0f}s)", flush=True)
        if ckpt_every and (step + 1) % ckpt_every == 0 and step + 1 < steps:
            os.makedirs(ckpt, exist_ok=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step + 1, "seconds": prior_seconds + time.perf_counter() - t0,
                        "history": history}, os.path.join(ckpt, "state.pt.tmp"))
            os.replace(os.path.join(ckpt, "state.pt.tmp"), os.path.join(ckpt, "state.pt"))
    seconds = prior_seconds + time.perf_counter() - t0
    model.eval()
    work = out + ".tmp"
    shutil.rmtree(work, ignore_errors=True)
    model.save_pretrained(work)
    tok.save_pretrained(work)
    write_preprocessor(work)
    log = {"seed": seed, "steps": steps, "batch": batch, "hard_negatives": hard, "lr": lr,
           "vae_fraction": vae_fraction, "pool_size": pool_size, "threads": threads, "seconds": round(seconds, 1),
           "parameters": sum(p.numel() for p in model.parameters()),
           "command": f"densegrpo train-scorer --out {out} --seed {seed} --steps {steps}", "history": history}
    with open(os.path.join(work, "scorer.json"), "w") as f:
        json.dump(log, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(work, out)
    shutil.rmtree(ckpt, ignore_errors=True)
    return log


# ------------------------------------------------------------------------------------------ figures

def _win_rates(emb, images, prompts, dets, rng, max_per_kind: int = 3) -> dict:
    """For each kind: the fraction of (image, hard negative false on it) pairs where cos(image, true caption) >
    cos(image, negative); "all": images whose true caption beats all their sampled negatives. Only images whose true
    caption holds count."""
    ie = emb.image_embeds(images)
    pairs = {k: [] for k in KINDS}
    for i, (p, d) in enumerate(zip(prompts, dets)):
        if not holds(p, d):
            continue
        for kind, negs in hard_negatives(p).items():
            negs = [q for q in negs if not holds(q, d)]
            if len(negs) > max_per_kind:
                negs = [negs[j] for j in rng.choice(len(negs), size=max_per_kind, replace=False)]
            pairs[kind] += [(i, p.text, q.text) for q in negs]
    texts = sorted({t for v in pairs.values() for _, x, y in v for t in (x, y)})
    te = dict(zip(texts, emb.text_embeds(texts))) if texts else {}
    out, beats_all = {}, {}
    for kind, v in pairs.items():
        if not v:
            continue
        w = [float(ie[i] @ te[x]) > float(ie[i] @ te[y]) for i, x, y in v]
        out[kind] = {"win_rate": float(np.mean(w)), "pairs": len(v)}
        for (i, _, _), ok in zip(v, w):
            beats_all[i] = beats_all.get(i, True) and ok
    out["all"] = {"win_rate": float(np.mean(list(beats_all.values()))) if beats_all else float("nan"),
                  "pairs": len(beats_all)}
    return out


@torch.no_grad()
def scorer_figures(folder: str = ASSET, per_prompt: int = 4, steps: int = 10, guidance: float = 4.5,
                   seed: int = 0, out_json: Optional[str] = None, threads: int = 1) -> dict:
    """The shipped scorer's figures on the test split (rendered scenes and base-model samples)."""
    from scipy.stats import spearmanr
    from ..eval import generate
    from ..models.base import models_from_pipe
    from ..models.sd3 import SD3Family
    from ..rewards.clip import ClipEmbedder
    from ..rewards.shapes_verifier import ShapesVerifier, detect
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    emb = ClipEmbedder(folder, device="cpu")
    test = load_split("test")
    rng = np.random.default_rng([seed, 11])
    # rendered scenes
    ps = [p for p in test for _ in range(per_prompt)]
    x, dets = _render(ps, np.random.default_rng([seed, 10]))
    res = {"rendered": _win_rates(emb, x, ps, dets, rng)}
    # the base model's samples (the trainer's evaluation settings: ODE, shift 3, CFG)
    pipe = SD3Family().from_pretrained(BASE_MODEL)
    m = models_from_pipe(pipe, "cpu", torch.float32, 4, SD3Family())
    pairs = [(i, j) for i in range(len(test)) for j in range(per_prompt)]
    imgs = generate(pipe.transformer, m.text, m.decode, m.latent_shape, [p.text for p in test], pairs,
                    m.sigmas(steps, 3.0), guidance, seed, "cpu", m.family, batch=32)
    texts = [test[i].text for i, _ in pairs]
    part, strict = ShapesVerifier()(imgs, texts)
    u8 = (imgs.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sdets = detect(u8)
    res["samples"] = _win_rates(emb, imgs, [test[i] for i, _ in pairs], sdets, rng)
    s = (emb.image_embeds(imgs) * emb.text_embeds(texts)).sum(-1).numpy()
    cats = np.array([test[i].category for i, _ in pairs])
    pid = np.array([i for i, _ in pairs])
    rho = spearmanr(s, part)[0]
    per_cat = {c: float(spearmanr(s[cats == c], part[cats == c])[0]) for c in dict.fromkeys(cats)
               if np.ptp(part[cats == c]) > 0}
    # within a prompt's samples (what a GRPO group compares): pairs the verifier orders, ordered alike
    conc, n_pairs = 0, 0
    for i in np.unique(pid):
        k = np.nonzero(pid == i)[0]
        for u in range(len(k)):
            for v in range(u + 1, len(k)):
                dp = part[k[u]] - part[k[v]]
                if dp != 0:
                    n_pairs += 1
                    conc += (s[k[u]] - s[k[v]]) * dp > 0
    res["samples_vs_verifier"] = {
        "spearman": float(rho), "spearman_per_category": per_cat,
        "within_prompt_concordance": float(conc / max(1, n_pairs)), "within_prompt_pairs": int(n_pairs),
        "strict_accuracy_samples": float(strict.mean()), "n_samples": int(len(texts)),
        "score_mean_strict": float(s[strict].mean()), "score_mean_not_strict": float(s[~strict].mean())}
    res["settings"] = {"folder": os.path.relpath(folder), "per_prompt": per_prompt, "ode_steps": steps,
                       "guidance": guidance, "seed": seed, "split": "test",
                       "seconds": round(time.perf_counter() - t0, 1)}
    if out_json:
        os.makedirs(os.path.dirname(out_json) or ".", exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(res, f, indent=1)
    return res


def figures_markdown(res: dict) -> str:
    rows = ["| hard negative | rendered test scenes: true caption ranks higher | pairs | base-model samples "
            "(verifier: true caption holds) | pairs |", "|---|---|---|---|---|"]
    for k in KINDS + ("all",):
        r, s = res["rendered"].get(k), res["samples"].get(k)
        if r is None and s is None:
            continue
        f = lambda d: (f"{d['win_rate']:.3f}", str(d["pairs"])) if d else ("-", "0")  # noqa: E731
        name = "beats all its sampled negatives" if k == "all" else k
        rows.append(f"| {name} | {' | '.join(f(r))} | {' | '.join(f(s))} |")
    v = res["samples_vs_verifier"]
    rows += ["", f"Base-model samples ({v['n_samples']}, strict accuracy {v['strict_accuracy_samples']:.3f}): "
             f"Spearman rank correlation of the scorer (cosine) with the verifier's partial score "
             f"**{v['spearman']:.3f}**; within a prompt's samples, pairs the verifier orders are ordered alike by "
             f"the scorer in **{v['within_prompt_concordance']:.3f}** of {v['within_prompt_pairs']}; mean score "
             f"{v['score_mean_strict']:.3f} on samples the verifier passes, {v['score_mean_not_strict']:.3f} on the "
             f"others.", "", "| category | Spearman with the verifier's partial score |", "|---|---|"]
    rows += [f"| {c} | {r:.3f} |" for c, r in v["spearman_per_category"].items()]
    return "\n".join(rows) + "\n"
