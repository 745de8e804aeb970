"""The shapes verifier's throughput on 64x64 images (target: >= 500 images/s on the 2-core CPU)."""
from densegrpo_fast.prompts.shapes import all_prompts
from densegrpo_fast.pretrain.render import render_batch
from densegrpo_fast.rewards.shapes_verifier import ShapesVerifier


def test_shapes_verifier_throughput(benchmark):
    ps = all_prompts()
    prompts = [ps[i % len(ps)] for i in range(512)]
    imgs = render_batch(prompts, seed=1)
    v = ShapesVerifier({p.text: p for p in ps})
    texts = [p.text for p in prompts]
    benchmark.pedantic(lambda: v(imgs, texts), rounds=5, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = round(len(prompts) / benchmark.stats.stats.median, 1)
    print(f"\nshapes verifier: {len(prompts) / benchmark.stats.stats.median:.0f} images/s (64x64, batch 512)")
