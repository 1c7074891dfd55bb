"""The package layout: imports point one way, with no circles, and no source file grows past a screenful of
screens.

Read from the source (``ast``), nothing is imported. Layers, lowest first: ``envs`` < ``sim.config`` <
``sim.engine`` < ``sim.algos`` < ``sim.lab``; a module may import its own layer and the layers below.
``analysis`` reads result files and may import ``envs`` only. Every import counts, also one inside a function
(a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("envs", "sim", "analysis")
LAYERS = ("envs", "sim.config", "sim.engine", "sim.algos", "sim.lab")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for n in names:
            while n and n not in MODULES:
                n = n.rpartition(".")[0]
            if n and n != name:
                found.add(n)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int | None:
    best = None
    for i, prefix in enumerate(LAYERS):
        if name == prefix or name.startswith(prefix + "."):
            best = i
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import from a lower layer to a higher one, and from ``analysis`` into ``sim``."""
    bad = []
    for a, deps in sorted(graph.items()):
        for b in sorted(deps):
            la, lb = _layer(a), _layer(b)
            if (la is not None and lb is not None and lb > la) or (a.startswith("analysis") and b.startswith("sim")):
                bad.append(f"{a} -> {b}")
    return bad


def test_the_graph_is_read():
    assert "sim.engine.loop" in GRAPH["sim.algos.discrete"]
    assert "sim.algos.ppo" in GRAPH["sim.lab.dispatch"]
    assert "envs" in GRAPH["sim.config.parse"]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_imports_point_down():
    assert upward_imports(GRAPH) == []


def test_the_checks_catch_what_they_look_for():
    """A planted upward import and a planted circle are found (so the two tests above can fail)."""
    graph = {k: set(v) for k, v in GRAPH.items()}
    graph["sim.engine.kl"].add("sim.algos.ppo")
    graph["analysis.report"].add("sim.lab.runs")
    assert upward_imports(graph) == ["analysis.report -> sim.lab.runs", "sim.engine.kl -> sim.algos.ppo"]
    assert any("sim.engine.kl" in c and "sim.algos.ppo" in c for c in _cycles(graph))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_the_line_budget(name: str):
    n = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {n} lines; split it by concern"


def test_no_file_holds_a_merge_conflict_marker():
    """A conflict resolved by hand must not leave its markers in any text file of the project."""
    suffixes = {".py", ".md", ".toml", ".yaml", ".yml", ".txt", ".cfg", ".ipynb"}
    markers = ("<" * 7 + " ", "=" * 7 + "\n", ">" * 7 + " ")
    found = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.suffix not in suffixes or not path.is_file() or rel.parts[0] in (".git", "results", "build") \
                or any(p.startswith(".") or p.endswith(".egg-info") for p in rel.parts[:-1]):
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(keepends=True), 1):
            if line.startswith(markers):
                found.append(f"{rel}:{i}")
    assert not found, found
