"""Each method's paired difference to Flow-GRPO from a compare.json, with a Bonferroni-corrected interval.

    python -m densegrpo_fast.experiments.pooled_vs_flow runs/compare_pooled/compare.json 10

The per-seed differences d_s = acc_after(method, s) - acc_after(flow_grpo, s), their mean and 95 % t-interval are
compare's own `paired_diff`; added here: the two-sided paired-t p and the t-interval at level 1 - 0.05/K for a
family of K comparisons with Flow-GRPO, with its verdict. Prints a markdown table.
"""
import json
import math
import sys

from scipy import stats as st

from .compare import paired_diff
from ..stats import verdict


def main(path: str, family: int) -> None:
    with open(path) as fh:
        table = json.load(fh)["table"]
    f = lambda x: f"{x:+.3f}".replace("-", "−")  # noqa: E731
    print(f"| method − Flow-GRPO | seeds | ahead on | per seed | mean (95 % CI) | p (paired t) | Bonferroni ×{family} "
          "interval | verdict after correction |")
    print("|---|---|---|---|---|---|---|---|")
    for m in table:
        d = paired_diff(table, m, "flow_grpo") if m != "flow_grpo" else None
        if d is None:
            continue
        n, mu, se = d["n"], d["mean"], d["std"] / math.sqrt(d["n"])
        p = 2 * st.t.sf(abs(mu / se), n - 1)
        half = st.t.ppf(1 - 0.025 / family, n - 1) * se
        lo, hi = d["ci"]
        print(f"| {m} | {n} | {sum(x > 0 for x in d['diffs'])} of {n} | {', '.join(f(x) for x in d['diffs'])} | "
              f"{f(mu)} ({f(lo)}, {f(hi)}) | {p:.3f} | ({f(mu - half)}, {f(mu + half)}) | "
              f"{verdict(mu - half, mu + half)} |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
