"""FLUX.1 pipelines: a tiny one built from configs (tests, CPU runs), loaded through the same
`FluxPipeline.from_pretrained(local folder)` call as a real FLUX.1-dev checkpoint; nothing is fetched from a hub."""
from __future__ import annotations

import os
import shutil
import string

import torch

from .sd3 import ModelFolderError, write_clip_tokenizer


def write_t5_tokenizer(folder: str, words: list[str], max_length: int) -> None:
    """A T5 (Unigram) tokenizer whose vocabulary spells every word of `words` as one piece ('▁word'), with single
    letters and digits as a fallback: <pad> = 0, </s> = 1, <unk> = 2 as in T5."""
    from transformers import T5Tokenizer
    chars = string.ascii_lowercase + string.digits
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in sorted(set(words)) if w]
    vocab += [("▁" + c, -4.0) for c in chars] + [(c, -5.0) for c in chars]
    seen: set = set()
    vocab = [v for v in vocab if not (v[0] in seen or seen.add(v[0]))]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)
    tok.save_pretrained(folder)


def build_tiny_flux(folder: str, words: list[str], spec, seed: int = 0):
    """Write a randomly initialised tiny FLUX.1-dev-architecture pipeline (diffusers format) to `folder`.

    spec: config.TinyModelConfig. VAE downsampling 2^(len(vae_block_channels)-1); the transformer takes 2x2-packed
    latents (in_channels = 4 x latent_channels), num_layers double-stream + num_layers single-stream blocks, a
    guidance embedding (dev); CLIP (pooled) + T5 (sequence) text encoders with tokenizers over `words`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(seed)
    tok_dir, t5_dir = os.path.join(folder, "_tok"), os.path.join(folder, "_t5tok")
    write_clip_tokenizer(tok_dir, words, spec.tokenizer_max_length)
    write_t5_tokenizer(t5_dir, words, 512)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokenizer_2 = T5Tokenizer.from_pretrained(t5_dir)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=spec.text_hidden, intermediate_size=2 * spec.text_hidden,
        num_hidden_layers=max(spec.text_layers, 1), num_attention_heads=2,
        max_position_embeddings=spec.tokenizer_max_length, projection_dim=spec.text_hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=spec.text_hidden, d_kv=spec.text_hidden // 2,
                                 d_ff=2 * spec.text_hidden, num_layers=max(spec.text_layers, 1), num_heads=2,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    n_down = len(spec.vae_block_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n_down,
                        up_block_types=["UpDecoderBlock2D"] * n_down, block_out_channels=list(spec.vae_block_channels),
                        latent_channels=spec.latent_channels, layers_per_block=1,
                        norm_num_groups=min(8, spec.vae_block_channels[0]), sample_size=spec.resolution,
                        scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False)
    hd = spec.attention_head_dim
    side = (hd * 3 // 8) // 2 * 2                     # rotary axes (text, h, w): even sizes summing to the head dim
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * spec.latent_channels, num_layers=spec.num_layers,
        num_single_layers=spec.num_layers, attention_head_dim=hd, num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.text_hidden, pooled_projection_dim=spec.text_hidden, guidance_embeds=True,
        axes_dims_rope=(hd - 2 * side, side, side))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(folder)
    shutil.rmtree(tok_dir, ignore_errors=True)
    shutil.rmtree(t5_dir, ignore_errors=True)
    return pipe


def load_flux(path: str, dtype: torch.dtype = torch.float32):
    """FluxPipeline.from_pretrained(path) from a local folder, offline, with errors naming the folder."""
    from diffusers import FluxPipeline
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return FluxPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise ModelFolderError(f"model folder '{path}' could not be loaded as a FluxPipeline: "
                               f"{type(exc).__name__}: {exc}") from exc
