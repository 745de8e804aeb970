"""Benchmarks (pytest-benchmark). Each op is timed against torch eager in the same run; the session prints a table
of medians, ratios, achieved GB/s and the fraction of this machine's copy bandwidth (measured in the same run),
and appends it to bench/results.csv with the device name."""
import csv
import datetime
import os
import platform
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

RESULTS: dict = {}   # (group, name) -> {"median_s", "bytes"}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


@pytest.fixture
def record(benchmark):
    def _record(group: str, name: str, nbytes: int):
        RESULTS[(group, name)] = {"median_s": benchmark.stats.stats.median, "bytes": nbytes}
    return _record


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS:
        return
    dev = device_name()
    rows = []
    groups = sorted({g for g, _ in RESULTS})
    big = RESULTS.get(("machine", "copy_256MB"))
    big_bw = big["bytes"] / big["median_s"] / 1e9 if big else float("nan")
    for g in groups:
        if g == "machine":
            rows.append([g, "copy_256MB", f"{big['median_s'] * 1e3:.3f}", f"{big_bw:.1f}", "", "1.00", ""])
            continue
        copy = RESULTS.get((g, "copy"))
        eager = RESULTS.get((g, "eager"))
        copy_bw = copy["bytes"] / copy["median_s"] / 1e9 if copy else float("nan")
        for (gg, name), r in sorted(RESULTS.items()):
            if gg != g:
                continue
            bw = r["bytes"] / r["median_s"] / 1e9
            speed = eager["median_s"] / r["median_s"] if eager else float("nan")
            rows.append([g, name, f"{r['median_s'] * 1e3:.3f}", f"{bw:.1f}", f"{bw / copy_bw:.2f}",
                         f"{bw / big_bw:.2f}", f"{speed:.2f}"])
    # frac_copy_same: vs a copy of the same bytes (cache-resident when small); frac_copy_machine: vs the machine's
    # copy bandwidth, a 256 MB copy that no cache holds.
    head = ["case", "path", "median_ms", "GB/s", "frac_copy_same", "frac_copy_machine", "x_eager"]
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["", f"device: {dev}", "  ".join(h.ljust(n) for h, n in zip(head, w))]
    lines += ["  ".join(str(x).ljust(n) for x, n in zip(r, w)) for r in rows]
    print("\n".join(lines))
    path = os.path.join(os.path.dirname(__file__), "results.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        wr = csv.writer(f)
        if new:
            wr.writerow(["date", "device", "torch"] + head)
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        for r in rows:
            wr.writerow([stamp, dev, torch.__version__] + r)
