"""CLIP-family rewards by composition: one CLIP image/text embedder from a local transformers folder, small heads.

  pickscore     PickScore as its model is used: logit_scale * cos(image, prompt), divided by 26 (the normalisation
                Flow-GRPO's trainer uses, so a typical PickScore of 21-23 reads 0.8-0.9). Point `path` at a local
                copy of the PickScore checkpoint (a CLIPModel folder with its tokenizer and preprocessor config).
  clip_score    cos(image, prompt) of any CLIP checkpoint (raw cosine in [-1, 1]).
  aesthetic     the LAION aesthetic predictor: a linear or MLP head (a stack of Linear layers, as the improved
                aesthetic predictor stores it: layers.N.weight/bias, no activations) over the L2-normalised CLIP
                image embedding (ViT-L/14: 768). `path` = the CLIP folder, `head` = the .pth / .safetensors file.

Preprocessing runs on the reward's device, batched: resize the shortest side to the processor's size (bicubic,
antialiased), center-crop, normalise with its mean and std (read from preprocessor_config.json; CLIP's defaults
otherwise). Nothing is fetched: a missing folder or a head that does not fit the embedding is a RewardError naming
the file.
"""
from __future__ import annotations

import json
import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from .registry import RewardError, register

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ClipEmbedder:
    """CLIPModel + tokenizer + preprocessing constants from a local folder; normalised embeddings in fp32."""

    def __init__(self, path: Optional[str], device: Optional[str] = None, dtype: str = "float32",
                 batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPModel
        if not path or not os.path.isdir(path):
            raise RewardError(f"CLIP reward: model folder '{path}' does not exist (reward.components.<name>.path; "
                              "nothing is downloaded)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _DTYPES[dtype]
        self.batch_size = int(batch_size)
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=self.dtype).to(self.device)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise RewardError(f"CLIP reward: '{path}' could not be loaded as a CLIPModel folder: "
                              f"{type(exc).__name__}: {exc}") from exc
        self.model.eval().requires_grad_(False)
        size = self.model.config.vision_config.image_size
        self.size, self.crop, self.mean, self.std = size, size, CLIP_MEAN, CLIP_STD
        pp = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pp):
            with open(pp) as f:
                c = json.load(f)
            s = c.get("size", size)
            self.size = s.get("shortest_edge", size) if isinstance(s, dict) else int(s)
            cs = c.get("crop_size", self.size)
            self.crop = cs.get("height", self.size) if isinstance(cs, dict) else int(cs)
            self.mean, self.std = tuple(c.get("image_mean", CLIP_MEAN)), tuple(c.get("image_std", CLIP_STD))
        self.max_text = min(getattr(self.tokenizer, "model_max_length", 77) or 77,
                            self.model.config.text_config.max_position_embeddings)
        self.lock = threading.Lock()  # reward threads share one model

    @classmethod
    def from_model(cls, model, tokenizer, device=None, batch_size: int = 32) -> "ClipEmbedder":
        """An embedder around an in-memory CLIPModel + tokenizer (benchmarks of an architecture with random
        weights); preprocessing constants are CLIP's defaults at the model's image size."""
        self = cls.__new__(cls)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.dtype = next(model.parameters()).dtype
        self.tokenizer, self.batch_size = tokenizer, int(batch_size)
        self.size = self.crop = model.config.vision_config.image_size
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        self.max_text = min(getattr(tokenizer, "model_max_length", 77) or 77,
                            model.config.text_config.max_position_embeddings)
        self.lock = threading.Lock()
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> (B,3,crop,crop) normalised, on the device, fp32."""
        x = images.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        s = self.size / min(h, w)
        nh, nw = max(self.crop, round(h * s)), max(self.crop, round(w * s))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - self.crop) // 2, (nw - self.crop) // 2
        x = x[..., top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> (B,D) L2-normalised, fp32, in batches of batch_size."""
        out = []
        for s in range(0, images.shape[0], self.batch_size):
            px = self.preprocess(images[s:s + self.batch_size]).to(self.dtype)
            with self.lock:
                e = self.model.get_image_features(pixel_values=px)
            e = e if torch.is_tensor(e) else e.pooler_output
            out.append(F.normalize(e.float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for s in range(0, len(prompts), self.batch_size):
            tok = self.tokenizer(prompts[s:s + self.batch_size], padding="max_length", truncation=True,
                                 max_length=self.max_text, return_tensors="pt").to(self.device)
            with self.lock:
                e = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
            e = e if torch.is_tensor(e) else e.pooler_output
            out.append(F.normalize(e.float(), dim=-1))
        return torch.cat(out)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())


_EMBEDDERS: dict = {}


def embedder(path, device=None, dtype="float32", batch_size=32) -> ClipEmbedder:
    """One embedder per (folder, device, dtype): PickScore and CLIP score on the same folder share it."""
    key = (os.path.abspath(path) if path else path, device, dtype)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = ClipEmbedder(path, device, dtype, batch_size)
    return _EMBEDDERS[key]


@register("pickscore")
def pickscore(_cfg=None, path=None, device=None, dtype="float32", batch_size=32):
    emb = embedder(path, device, dtype, batch_size)

    def reward(images, prompts):
        return emb.logit_scale * (emb.image_embeds(images) * emb.text_embeds(prompts)).sum(-1) / 26.0
    return reward


@register("clip_score")
def clip_score(_cfg=None, path=None, device=None, dtype="float32", batch_size=32):
    emb = embedder(path, device, dtype, batch_size)

    def reward(images, prompts):
        return (emb.image_embeds(images) * emb.text_embeds(prompts)).sum(-1)
    return reward


def load_head(path: Optional[str], dim: int) -> torch.nn.Module:
    """A linear head (weight/bias) or a Linear stack (layers.N.weight/bias, applied in order, no activations) from a
    .pth / .safetensors file; the first layer must take the `dim`-wide embedding and the last give one score."""
    if not path or not os.path.isfile(path):
        raise RewardError(f"aesthetic reward: head file '{path}' not found (reward.components.<name>.head)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    weights = sorted((k for k in sd if k.endswith("weight") and sd[k].dim() == 2),
                     key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")])
    if not weights:
        raise RewardError(f"aesthetic reward: '{path}' holds no 2-D weight (keys: {sorted(sd)[:8]})")
    layers = []
    for k in weights:
        w = sd[k].float()
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w)
            b = sd.get(k[:-len("weight")] + "bias")
            lin.bias.copy_(b.float() if b is not None else torch.zeros(w.shape[0]))
        layers.append(lin)
    if layers[0].in_features != dim or layers[-1].out_features != 1:
        raise RewardError(f"aesthetic reward: head '{path}' maps {layers[0].in_features} -> "
                          f"{layers[-1].out_features}, but the CLIP image embedding has {dim} dimensions and the "
                          "head must give 1 score")
    for a, b in zip(layers[:-1], layers[1:]):
        if a.out_features != b.in_features:
            raise RewardError(f"aesthetic reward: head '{path}': layer shapes do not chain "
                              f"({a.out_features} -> {b.in_features})")
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)


@register("aesthetic")
def aesthetic(_cfg=None, path=None, head=None, device=None, dtype="float32", batch_size=32):
    emb = embedder(path, device, dtype, batch_size)
    mlp = load_head(head, emb.model.config.projection_dim).to(emb.device)

    def reward(images, prompts):
        return mlp(emb.image_embeds(images)).squeeze(-1)
    return reward
