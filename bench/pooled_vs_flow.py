"""Each method's paired difference to Flow-GRPO from a compare.json, with a Bonferroni-corrected interval.

    python bench/pooled_vs_flow.py runs/compare_pooled/compare.json 10

Per seed d_s = acc_after(method, s) - acc_after(flow_grpo, s); mean, 95 % t-interval (n - 1 dof), two-sided paired-t
p, and the t-interval at level 1 - 0.05/K for a family of K comparisons with Flow-GRPO. Prints a markdown table.
"""
import json
import sys

import numpy as np
from scipy import stats as st
J = json.load(open(sys.argv[1])); K = int(sys.argv[2])  # family size for Bonferroni
T = J["table"]; f = lambda x: f"{x:+.3f}".replace("-", "−")
fl = dict(zip(T["flow_grpo"]["seed"], T["flow_grpo"]["acc_after"]))
print(f"| method − Flow-GRPO | seeds | ahead on | per seed | mean (95 % CI) | p (paired t) | Bonferroni ×{K} interval | verdict after correction |")
print("|---|---|---|---|---|---|---|---|")
for m, c in T.items():
    if m == "flow_grpo": continue
    d = np.array([a - fl[s] for s, a in zip(c["seed"], c["acc_after"])]); n = len(d)
    mu, se = d.mean(), d.std(ddof=1) / np.sqrt(n)
    t95 = st.t.ppf(0.975, n - 1); tb = st.t.ppf(1 - 0.025 / K, n - 1)
    p = 2 * st.t.sf(abs(mu / se), n - 1)
    lo, hi = mu - tb * se, mu + tb * se
    v = "resolved better" if lo > 0 else "resolved worse" if hi < 0 else "not resolved"
    print(f"| {m} | {n} | {(d>0).sum()} of {n} | {', '.join(f(x) for x in d)} | {f(mu)} ({f(mu-t95*se)}, {f(mu+t95*se)}) | {p:.3f} | ({f(lo)}, {f(hi)}) | {v} |")
