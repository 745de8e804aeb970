"""Load test of the reward server on 127.0.0.1 (bounded): 2,000 images of 64x64 in 64-image requests from 4 client
threads against `densegrpo reward-server --reward jpeg_compressibility` (in-process, threading HTTP server).
`python -m pytest bench/bench_remote_reward.py -s` prints images/s and the p50 / p99 request latency."""
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def test_reward_server_load(benchmark):
    from densegrpo_fast.rewards.remote import make_server, remote
    srv = make_server("jpeg_compressibility", "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    score = remote(None, url=url, timeout_s=30, retries=0, batch_size=64)
    imgs = torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    n_req = 2000 // 64 + 1                                   # 32 requests x 64 = 2,048 images
    lat = []

    def one(_):
        t = time.perf_counter()
        out = score(imgs, ["p"] * 64)
        lat.append(time.perf_counter() - t)
        return out.numel()

    def run():
        lat.clear()
        with ThreadPoolExecutor(4) as ex:
            return sum(ex.map(one, range(n_req)))

    try:
        n = benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        srv.shutdown()
    wall = benchmark.stats.stats.median
    q = statistics.quantiles(lat, n=100)
    print(f"\nreward server (jpeg, 64x64, 64 images/request, 4 client threads): {n / wall:.0f} images/s; "
          f"request latency p50 {q[49] * 1e3:.0f} ms, p99 {q[98] * 1e3:.0f} ms ({n} images in {wall:.1f} s)")
    assert n == n_req * 64
