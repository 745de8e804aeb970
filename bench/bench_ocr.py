"""OCR reward throughput at 512 px on this machine (PP-OCR det + rec via ONNX Runtime, CPU):
`python -m pytest bench/bench_ocr.py -s`. Images carry one rendered line of text each (tests/test_ocr_reward.py)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def test_ocr_reward_throughput(benchmark):
    from densegrpo_fast.rewards import CombinedReward
    from test_ocr_reward import render
    words = ["Spring Collection", "Forever Yours", "Step Goal", "Open Late", "Harbor Lights", "Fresh Bread",
             "Exit Only", "Happy Birthday"]
    imgs = torch.stack([render(w) for w in words])
    prompts = [f'a sign that says "{w}"' for w in words]
    r = CombinedReward({"ocr": 1.0})
    scores, _ = benchmark.pedantic(r, args=(imgs, prompts), rounds=3, iterations=1, warmup_rounds=1)
    med = benchmark.stats.stats.median
    print(f"\nOCR reward: {len(words) / med:.2f} images/s at 512 px ({med / len(words) * 1e3:.0f} ms/image, "
          f"{torch.get_num_threads()} threads); mean score on the right text {scores.mean():.3f}")
    assert scores.min() >= 0.9
