"""experiments/pooled_vs_flow.py: with a family of one its corrected interval is compare's own 95 % paired interval,
and a larger family only widens it."""
import json

from densegrpo_fast.experiments.compare import paired_diff


def _load():
    from densegrpo_fast.experiments import pooled_vs_flow
    return pooled_vs_flow


def _rows(out: str) -> dict:
    rows = [r.split("|")[1:-1] for r in out.splitlines() if r.startswith("| ") and "Flow-GRPO" not in r]
    return {c[0].strip(): [x.strip() for x in c] for c in rows}


def test_family_one_is_the_paired_interval(tmp_path, capsys):
    table = {"flow_grpo": {"seed": [0, 1, 2, 3], "acc_after": [0.40, 0.41, 0.38, 0.43]},
             "dense": {"seed": [0, 1, 2, 3], "acc_after": [0.30, 0.35, 0.31, 0.36]},
             "tempflow": {"seed": [0, 1, 2, 3], "acc_after": [0.45, 0.39, 0.40, 0.41]}}
    path = tmp_path / "compare.json"
    path.write_text(json.dumps({"table": table}))
    mod = _load()
    mod.main(str(path), 1)
    one = _rows(capsys.readouterr().out)
    mod.main(str(path), 10)
    ten = _rows(capsys.readouterr().out)
    assert set(one) == {"dense", "tempflow"}
    f = lambda x: f"{x:+.3f}".replace("-", "−")  # noqa: E731
    for m in one:
        d = paired_diff(table, m, "flow_grpo")
        assert one[m][4] == f"{f(d['mean'])} ({f(d['ci'][0])}, {f(d['ci'][1])})"
        assert one[m][6] == f"({f(d['ci'][0])}, {f(d['ci'][1])})"     # Bonferroni x1 = the 95 % interval
        assert one[m][3] == ", ".join(f(x) for x in d["diffs"])
        lo1, hi1 = (float(x.replace("−", "-")) for x in one[m][6].strip("()").split(", "))
        lo10, hi10 = (float(x.replace("−", "-")) for x in ten[m][6].strip("()").split(", "))
        assert lo10 < lo1 and hi10 > hi1
    assert one["dense"][7] == "resolved worse" and one["tempflow"][7] == "not resolved"
