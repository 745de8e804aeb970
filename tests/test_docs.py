"""The documentation: the README stays short, its links and commands point at things that exist, the configuration
reference matches the dataclasses, and no page or code comment speaks of how the work was organised."""
import glob
import os
import re

from conftest import ROOT

INTERNAL = [r"\bissues? #?\d+", r"\bsessions?\b", r"\bitem \d+\b"]


def _files():
    yield os.path.join(ROOT, "README.md")
    yield from glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
    yield from glob.glob(os.path.join(ROOT, "densegrpo_fast", "**", "*.py"), recursive=True)


def test_no_internal_words():
    hits = []
    for path in _files():
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                for pat in INTERNAL:
                    if re.search(pat, line, re.IGNORECASE):
                        hits.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "words about how the work was organised (history belongs in git log):\n" + "\n".join(hits)


def test_readme_is_short_and_its_links_exist():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.encode()) <= 12 * 1024
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 10
    missing = [l for l in links if not l.startswith("http") and not os.path.exists(os.path.join(ROOT, l))]
    assert not missing, missing


def test_docs_links_exist():
    missing = []
    for page in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True):
        text = open(page, encoding="utf-8").read()
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not link.startswith("http") and not os.path.exists(os.path.join(os.path.dirname(page), link)):
                missing.append(f"{os.path.relpath(page, ROOT)}: {link}")
    assert not missing, missing


def test_readme_commands_point_at_existing_targets_and_files():
    prose = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    # commands live in code: fenced blocks and `inline spans` (prose such as "make an epoch dearer" is not one)
    text = "\n".join(re.findall(r"```.*?```", prose, re.S) + re.findall(r"`([^`\n]+)`", prose))
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.MULTILINE))
    for t in set(re.findall(r"\bmake ([\w-]+)", text)):
        assert t in targets, f"README: make {t} is not a Makefile target"
    for path in set(re.findall(r"\b((?:configs|bench|docs)/[\w./-]+\.(?:yaml|py|sh|md))", text)):
        assert os.path.exists(os.path.join(ROOT, path)), path
    from densegrpo_fast.cli import main  # the sub-commands the README names are the CLI's
    import contextlib
    import io
    for sub in set(re.findall(r"\bdensegrpo (\w[\w-]*)", text)):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                rc = main([sub, "--help"])
            except SystemExit as exc:
                rc = exc.code
        assert rc == 0, f"README: densegrpo {sub} --help failed: {buf.getvalue()[-300:]}"


def test_configuration_reference_is_up_to_date():
    """docs/configuration.md is `python -m densegrpo_fast.configdoc`'s output; every key has a meaning."""
    from densegrpo_fast.config import Config
    from densegrpo_fast.configdoc import render, rows
    r = rows()
    assert [k for k, *_, meaning in r if not meaning] == []
    import dataclasses
    assert len(r) >= 90
    with open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8") as f:
        assert f.read() == render(), ("docs/configuration.md is out of date: run "
                                      "`python -m densegrpo_fast.configdoc > docs/configuration.md`")
    assert {k.split(".")[0] for k, *_ in r} == {f.name for f in dataclasses.fields(Config)}
