"""The layout holds: imports flow one way (the import-linter contracts in pyproject.toml), and no module or
package imports another that imports it back, directly or through others (function-level imports included)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "actors", "train", "jobs")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each a cycle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def module_edges() -> dict[str, set[str]]:
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    return {m: {i for i in graph.find_modules_directly_imported_by(m) if i.split(".")[0] in PACKAGES}
            for m in graph.modules}


def package_of(module: str, packages: set[str]) -> str:
    while module not in packages:
        module = module.rsplit(".", 1)[0]
    return module


def test_import_contracts_are_kept():
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_no_import_cycle_between_files():
    assert cycles(module_edges()) == []


def test_no_import_cycle_between_packages():
    edges = module_edges()
    packages = {m for m in edges if (ROOT / m.replace(".", "/") / "__init__.py").exists()}
    collapsed: dict[str, set[str]] = {}
    for m, targets in edges.items():
        src = package_of(m, packages)
        for t in targets:
            dst = package_of(t, packages)
            if dst != src and not src.startswith(dst + ".") and not dst.startswith(src + "."):
                collapsed.setdefault(src, set()).add(dst)
    assert cycles(collapsed) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
