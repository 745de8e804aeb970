"""The `densegrpo` command table: every row resolves to its function, the help lists every row, usage errors exit 2,
and the sub-command names the package has always had are all there."""
import contextlib
import io
import subprocess

import pytest

from conftest import PY, ROOT
from densegrpo_fast import cli

NAMES = ["train", "prompts", "pretrain", "eval", "calibrate", "compare", "plan", "reward-server", "train-scorer",
         "scorer-figures", "diagnose"]


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_the_table_keeps_every_sub_command_and_resolves_each():
    assert list(cli.COMMANDS) == NAMES
    for name, cmd in cli.COMMANDS.items():
        assert cmd.target.count(":") == 1 and cmd.help, name
        assert callable(cli.resolve(name)), name
    from densegrpo_fast.tools import train_main
    assert cli.resolve("train") is train_main


def test_help_lists_the_table_and_usage_errors_exit_2():
    rc, out, _ = _main(["--help"])
    assert rc == 0
    for name, cmd in cli.COMMANDS.items():
        assert name in out and cmd.help.split()[0] in out, name
    assert _main([])[0] == 2 and _main(["nope"])[0] == 2
    assert "invalid choice" in _main(["nope"])[2]


def test_a_sub_command_gets_its_own_arguments():
    """`densegrpo NAME --help` is NAME's own help (the table passes every argument on)."""
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(io.StringIO()) as out:
        cli.main(["compare", "--help"])
    assert exc.value.code == 0 and "--budget-s" in out.getvalue()
    rc, _, err = _main(["compare", "--methods", "nope", "--report-only"])
    assert rc == 2 and "unknown ['nope']" in err


@pytest.mark.slow
def test_python_m_cli_and_train_py_run():
    """`python -m densegrpo_fast.cli compare` (bench/compare_lanes.sh) and `train.py` still run."""
    r = subprocess.run([PY, "-m", "densegrpo_fast.cli", "compare", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "--eval-every-s" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([PY, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--run-dir" in r.stdout, r.stderr[-2000:]
