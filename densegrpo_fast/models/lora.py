"""LoRA on a family's transformer (peft), the reference policy (adapter off) and export in the diffusers format that
the family's pipeline reads with `load_lora_weights`."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch


def lora_targets(lora_cfg, family) -> list:
    """model.lora.targets, or the family's default targets when it is null."""
    return list(lora_cfg.targets if lora_cfg.targets is not None else family.lora_targets)


def add_lora(transformer, lora_cfg, family, seed: int = 0):
    """LoRA (peft) on lora_targets(lora_cfg, family); base weights frozen. Returns the trainable parameters."""
    from peft import LoraConfig
    targets = lora_targets(lora_cfg, family)
    transformer.requires_grad_(False)
    names = {n for n, _ in transformer.named_modules()}
    if not any(n.endswith("." + t) or n == t for t in targets for n in names):
        raise ValueError(f"model.lora.targets: none of {targets} match a module of the transformer")
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                                       init_lora_weights="gaussian", target_modules=targets))
    return [p for p in transformer.parameters() if p.requires_grad]


@contextmanager
def adapter_disabled(transformer):
    """The reference policy: the same network with the LoRA adapter switched off."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def lora_state_dict(transformer) -> dict:
    from peft.utils import get_peft_model_state_dict
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def lora_metadata(transformer) -> dict:
    """The adapter's LoraConfig as a dict (r, lora_alpha, targets): saved beside the weights so that
    load_lora_weights restores the scale alpha/r instead of assuming alpha = r."""
    return transformer.peft_config["default"].to_dict()


def save_lora(folder: str, state_dict: dict, metadata: Optional[dict], family: str) -> None:
    """diffusers format: loads with the family's pipeline, e.g. StableDiffusion3Pipeline.load_lora_weights(folder),
    FluxPipeline.load_lora_weights(folder) or QwenImagePipeline.load_lora_weights(folder)."""
    import diffusers
    from .registry import get_family
    if metadata is not None:
        metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    getattr(diffusers, get_family(family).pipeline_class).save_lora_weights(
        folder, transformer_lora_layers=state_dict, transformer_lora_adapter_metadata=metadata)
