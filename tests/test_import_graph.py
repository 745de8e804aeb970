"""The package's import graph: no circle of modules importing each other, and no module importing the command table
(`densegrpo_fast.cli`, which names the sub-commands by "module:function" and imports them only when one runs).

The graph is read from the source with `ast`: every `import` and `from ... import` of every module, at module level
or inside a function, absolute or relative; `from P import name` is an edge to the module P.name when that is a
module, else to P. A package's own __init__ is not an implied edge of importing one of its submodules (Python has
the package in sys.modules by then). Modules: densegrpo_fast/**.py and kernels/ (installed as
densegrpo_fast.kernels)."""
import ast
import os
import subprocess
import sys

import pytest

from conftest import PY, ROOT

PACKAGE = "densegrpo_fast"
SOURCES = [(os.path.join(ROOT, "densegrpo_fast"), PACKAGE), (os.path.join(ROOT, "kernels"), f"{PACKAGE}.kernels")]


def modules() -> dict:
    """module name -> (path, is_package)."""
    out = {}
    for base, prefix in SOURCES:
        for dirpath, dirnames, files in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(dirpath, f), base)[:-3].split(os.sep)
                is_pkg = parts[-1] == "__init__"
                out[".".join([prefix] + (parts[:-1] if is_pkg else parts))] = (os.path.join(dirpath, f), is_pkg)
    return out


def _known(name: str, mods: dict):
    """The module `name`, or the nearest enclosing one of the package (None: outside it)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict:
    """module -> {imported module: [line, ...]} within the package."""
    mods = modules()
    graph = {}
    for mod, (path, is_pkg) in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges: dict = {}
        here = mod if is_pkg else mod.rpartition(".")[0]  # the package relative imports start from
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    assert node.level - 1 < len(parts), f"{path}:{node.lineno}: relative import above the package"
                    base = ".".join(parts[:len(parts) - (node.level - 1)])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                k = _known(t, mods)
                if k is not None and k != mod:
                    edges.setdefault(k, []).append(node.lineno)
        graph[mod] = edges
    return graph


def strongly_connected(graph: dict) -> list:
    """Tarjan's strongly connected components of more than one module, each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def a_cycle(graph: dict, comp: list) -> list:
    """One circle through the component's first module: [a, b, ..., a] (breadth-first, so a shortest one)."""
    start, members = comp[0], set(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start} in {comp}")


def _describe(graph: dict, cycle: list) -> str:
    mods = modules()
    hops = [f"{a} -> {b} ({os.path.relpath(mods[a][0], ROOT)}:{graph[a][b][0]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n      " + "\n      ".join(hops)


def test_the_graph_reader_sees_every_kind_of_import():
    """The reader itself: relative imports at every level, function-local ones, `from P import submodule`."""
    g = import_graph()
    assert "densegrpo_fast.config" in g["densegrpo_fast.utils.cli_helpers"]        # `from ..config import` in a def
    assert "densegrpo_fast.stats" in g["densegrpo_fast.experiments.compare"]       # function-local `from ..stats`
    assert "densegrpo_fast.experiments.compare" in g["densegrpo_fast.experiments.pooled_vs_flow"]
    assert "densegrpo_fast.kernels" in g["densegrpo_fast.ops"]  # `from densegrpo_fast import kernels`
    assert strongly_connected({"a": {"b": [1]}, "b": {"c": [1]}, "c": {"a": [1]}, "d": {"a": [1]}}) == [["a", "b", "c"]]
    assert a_cycle({"a": {"b": [1]}, "b": {"a": [1]}}, ["a", "b"]) == ["a", "b", "a"]


def test_no_import_circle():
    g = import_graph()
    comps = strongly_connected(g)
    assert not comps, "import circles (strongly connected modules; one circle each, with the importing lines):\n" + \
        "\n".join(f"  [{', '.join(c)}]\n    {_describe(g, a_cycle(g, c))}" for c in comps)


def test_no_module_imports_the_command_table():
    g = import_graph()
    mods = modules()
    hits = [f"{m} ({os.path.relpath(mods[m][0], ROOT)}: line {', '.join(map(str, sorted(set(lines))))})"
            for m, e in g.items() for t, lines in e.items() if t == "densegrpo_fast.cli"]
    assert not hits, ("modules importing densegrpo_fast.cli (import what sub-commands share from "
                      "densegrpo_fast.utils.cli_helpers):\n  " + "\n  ".join(hits))


@pytest.mark.slow
def test_densegrpo_help_imports_no_torch():
    """`densegrpo --help` lists every sub-command from the table alone: neither torch nor any sub-command's module is
    imported."""
    code = ("import sys\n"
            "from densegrpo_fast import cli\n"
            "parser = cli.build_parser()\n"
            "text = parser.format_help()\n"
            "assert cli.main(['--help']) == 0\n"
            "heavy = [m for m in ('torch', 'numpy', 'diffusers', 'transformers', 'densegrpo_fast.tools',\n"
            "         'densegrpo_fast.config') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "missing = [n for n in cli.COMMANDS if n not in text]\n"
            "assert not missing, missing\n"
            "print('ok')\n")
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-2000:]
