"""Throughput of the CLIP-family rewards on this machine for the CLIP ViT-L/14 architecture (clip_score, the LAION
aesthetic predictor's backbone) and ViT-H/14 (PickScore's) with random weights built from their published configs —
no checkpoint is downloaded, and the speed does not depend on the weights. `python -m pytest bench/bench_clip_rewards.py
-s`. Scores 512 px images (resized and center-cropped to 224 on the device) against prompts."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


ARCH = {  # published CLIP configs: (text hidden, layers, heads, mlp), (vision hidden, layers, heads, mlp), projection
    "ViT-L/14 (clip_score, aesthetic)": ((768, 12, 12, 3072), (1024, 24, 16, 4096), 768),
    "ViT-H/14 (PickScore)": ((1024, 24, 16, 4096), (1280, 32, 16, 5120), 1024),
}


@pytest.mark.parametrize("arch", list(ARCH))
def test_clip_reward_throughput(benchmark, tmp_path, arch):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from densegrpo_fast.models.tokenizers import write_clip_tokenizer
    from densegrpo_fast.rewards.clip import ClipEmbedder
    write_clip_tokenizer(str(tmp_path), ["a", "red", "circle"], 77)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    (th, tl, tn, tm), (vh, vl, vn, vm), proj = ARCH[arch]
    cfg = CLIPConfig(text_config=dict(hidden_size=th, intermediate_size=tm, num_hidden_layers=tl,
                                      num_attention_heads=tn, max_position_embeddings=77,
                                      vocab_size=len(tok.get_vocab()), eos_token_id=tok.eos_token_id,
                                      bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
                     vision_config=dict(hidden_size=vh, intermediate_size=vm, num_hidden_layers=vl,
                                        num_attention_heads=vn, image_size=224, patch_size=14), projection_dim=proj)
    torch.manual_seed(0)
    emb = ClipEmbedder.from_model(CLIPModel(cfg), tok, "cpu", batch_size=8)
    imgs = torch.rand(8, 3, 512, 512)
    prompts = ["a red circle"] * 8

    def score():
        return (emb.image_embeds(imgs) * emb.text_embeds(prompts)).sum(-1)

    out = benchmark.pedantic(score, rounds=3, iterations=1, warmup_rounds=1)
    med = benchmark.stats.stats.median
    print(f"\nCLIP {arch} reward, fp32, {torch.get_num_threads()} threads: "
          f"{8 / med:.2f} images/s at 512 px ({med / 8 * 1e3:.0f} ms/image incl. its prompt)")
    assert out.shape == (8,)
