"""The credit diagnostics on a hand-made case, with the numbers derived in the comments; and one small run."""
import math
import os

import pytest
import torch

from densegrpo_fast import diagnose as dg

# Two groups of two trajectories, T = 2 steps: Q_0, Q_1, Q_2 per row.
Q = torch.tensor([[0.0, 0.5, 0.5],
                  [0.0, 0.0, 1.0],
                  [0.5, 0.5, 0.5],
                  [0.5, 1.0, 0.5]])
GROUPS = torch.tensor([0, 0, 1, 1])
# gains g = Q_{k+1} - Q_k: [[0.5, 0], [0, 1], [0, 0], [0.5, -0.5]]
G = Q[:, 1:] - Q[:, :-1]


def test_distinct_values():
    d = dg.distinct_values(Q)
    # values {0, 0.5, 1}; step 0 {0, 0.5}, step 1 {0, 0.5, 1}, step 2 {0.5, 1}; 12 entries
    assert d == {"overall": 3, "per_step": [2, 3, 2], "of": 12}


def test_zero_gain_fraction():
    # step 0 gains [0.5, 0, 0, 0.5] -> 2 of 4 zero; step 1 [0, 1, 0, -0.5] -> 2 of 4
    assert dg.zero_gain_fraction(G) == [0.5, 0.5]


def test_lag1():
    r = dg.lag1(G)
    # pairs (g_0, g_1): a = [.5, 0, 0, .5] (mean .25), b = [0, 1, 0, -.5] (mean .125)
    # sum (a - .25)(b - .125) = -.03125 - .21875 + .03125 - .15625 = -.375; sum (a-.)^2 = .25, sum (b-.)^2 = 1.1875
    assert r["corr"] == pytest.approx(-0.375 / math.sqrt(0.25 * 1.1875))
    # only the last pair has both gains non-zero (.5, -.5): one reversal of one
    assert r["reversal_rate"] == 1.0 and r["nonzero_pairs"] == 1


def test_variance_ratio():
    v = dg.variance_ratio(Q, GROUPS)
    # group-centred gains: group 0 [[.25, -.5], [-.25, .5]], group 1 [[-.25, .25], [.25, -.25]]
    # Var(g_0) = .0625, Var(g_1) = (.25 + .25 + .0625 + .0625) / 4 = .15625
    # Q_T - Q_0 = [.5, 1, 0, 0] -> centred [-.25, .25, 0, 0] -> Var = .03125; ratio = .21875 / .03125 = 7
    assert v["ratio"] == pytest.approx(7.0)
    assert v["per_step"] == pytest.approx([2.0, 5.0])
    assert v["cancelled"] == pytest.approx(1 - 1 / 7)


def test_corr_with_final():
    c = dg.corr_with_final(Q, GROUPS)
    # centred Q: group 0 [[0, .25, -.25], [0, -.25, .25]], group 1 [[0, -.25, 0], [0, .25, 0]]
    # k = 0: no variation -> nan; k = 1: [.25, -.25, -.25, .25] vs [-.25, .25, 0, 0]: -.125 / sqrt(.25 * .125)
    assert math.isnan(c[0])
    assert c[1] == pytest.approx(-0.125 / math.sqrt(0.25 * 0.125))
    assert c[2] == pytest.approx(1.0)


def test_advantage_agreement():
    s = dg.credit_signal(Q, GROUPS, adv_std="global", clip=5.0)
    a = s["agreement"]
    # dense (per group and step, unit std): rows ~ [[1, -1], [-1, 1], [-1, 1], [1, -1]]
    # sparse (Q_T = [.5, 1, .5, .5], global std .2165): [[-1.15]*2, [1.15]*2, [0, 0], [0, 0]]
    # both non-zero: rows 0, 1; signs agree at step 1 only -> 2 of 4; per step 0 of 2 and 2 of 2
    assert a["sign_agreement"] == 0.5
    assert a["sign_agreement_per_step"] == [0.0, 1.0]
    # sum of products: 1.15 (-1 + 1 - 1 + 1) = 0 -> correlation 0 (to the 1e-4 in the normalisation's denominator,
    # which scales a gain spread of .25 and of .5 slightly differently)
    assert a["corr"] == pytest.approx(0.0, abs=1e-3)
    # every dense advantage is non-zero; the gain is 0 at (0,1), (1,0), (2,0), (2,1): 4 of 8
    assert a["nonzero_adv_on_zero_gain"] == 0.5
    assert s["zero_gain_mean"] == 0.5


def test_perturbation_stats_jump_and_smooth():
    q = Q[:, :-1].double()
    q_step = q + 0.5                       # the step's perturbation moves every Q_k by .5
    q_small = q.clone()
    q_small[0, 0] += 0.5                   # the small one (0.01 x) flips one entry by .5
    p = dg.perturbation_stats(q, q_small, q_step, 0.01)
    assert p["flip_small"] == [0.25, 0.0] and p["flip_step"] == [1.0, 1.0]
    # step 0: E|dQ_small| = .125 -> (.125 / .01) / .5 = 25; step 1: 0; pooled: (.0625 / .01) / .5 = 12.5
    assert p["sensitivity"] == pytest.approx([25.0, 0.0])
    assert p["sensitivity_pooled"] == pytest.approx(12.5)
    # a Q_k linear in z_k: the small move changes it by .01 of the step's change -> sensitivity 1
    c = torch.tensor([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2], [0.2, 0.1]], dtype=torch.float64)
    p = dg.perturbation_stats(q, q + 0.01 * c, q + c, 0.01)
    assert p["sensitivity"] == pytest.approx([1.0, 1.0]) and p["sensitivity_pooled"] == pytest.approx(1.0)


def test_reading_markdown_and_plot(tmp_path):
    q_small, q_step = Q[:, :-1].clone(), Q[:, :-1] + 0.5
    s = dg.credit_signal(Q, GROUPS, perturbed=(q_small, q_step, 0.01))
    rows = dg.reading(s)
    assert rows[0][0] == "distinct values of Q_k" and rows[0][1] == "3 of 12"
    md = dg.markdown(s, "hand-made")
    assert "| 1 | 3 | 0.50 | 5.00 |" in md
    dg.plot(s, str(tmp_path / "d.png"))
    assert os.path.getsize(tmp_path / "d.png") > 1000


def test_diagnose_runs_on_the_shipped_model(tmp_path):
    from densegrpo_fast.cli import resolve
    out = tmp_path / "diag"
    rc = resolve("diagnose")(["--config", "configs/shapes_default.yaml", "--n", "4", "--group", "2",
                              "--set", "sampling.steps=3", "--set", "sampling.sample_batch=4",
                              "--out", str(out)])
    assert rc == 0
    import json
    res = json.loads((out / "diagnose.json").read_text())
    assert res["n"] == 4 and res["steps"] == 3 and len(res["q"]) == 4 and len(res["q"][0]) == 4
    assert len(res["perturbation"]["flip_small"]) == 3
    assert (out / "diagnose.png").is_file() and "| statistic |" in (out / "diagnose.md").read_text()
