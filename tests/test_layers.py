"""The layers point down and nothing imports in a circle (docs/architecture.md, "Layers").

Every import statement of ``tagger/`` and ``jobs/`` is read with ``ast``, also those inside functions and under
``TYPE_CHECKING``: an import hidden in a function is still an arrow, and hiding one is how the loops of the
previous rounds were kept out of sight (the same reading as ``../shared/tools/import_cycles.py``).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lower numbers sit lower. A package may import only packages of a lower layer: siblings of one layer (the
# tag job, evaluation, training) share what they need through the layers below, never through each other.
LAYERS = {
    "tagger": 0, "tagger.attributes": 0, "tagger.storage": 0, "tagger.metrics": 0,
    "tagger.data": 1,
    "tagger.model": 2,
    "tagger.tag": 3, "tagger.evaluation": 3, "tagger.training": 3, "tagger.demo": 3,
    "tagger.predict": 4, "tagger.report": 4,  # predict shows evaluation's scores; the report reads tag's partitions
    "jobs": 5,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for top in ("tagger", "jobs"):
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    edges[mod].add(name)
    return edges


def _package(mod: str) -> str:
    return "jobs" if mod.startswith("jobs") else ".".join(mod.split(".")[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_files_or_packages():
    edges = _edges(_modules())
    packages: dict[str, set[str]] = defaultdict(set)
    for a, targets in edges.items():
        for b in targets:
            if _package(a) != _package(b):
                packages[_package(a)].add(_package(b))
    assert _cycles(edges) == []
    assert _cycles(packages) == []


def test_every_package_has_a_layer_and_imports_only_below_it():
    mods = _modules()
    unplaced = sorted({_package(m) for m in mods} - set(LAYERS))
    assert unplaced == [], f"give these packages a layer in LAYERS: {unplaced}"
    upward = sorted(
        f"{a} -> {b}" for a, targets in _edges(mods).items() for b in targets
        if _package(a) != _package(b) and LAYERS[_package(b)] >= LAYERS[_package(a)]
    )
    assert upward == []


def test_the_model_layer_imports_neither_the_tag_job_nor_the_demo():
    edges = _edges(_modules())
    wrong = sorted(f"{a} -> {b}" for a, targets in edges.items() if a.startswith("tagger.model") for b in targets
                   if b.startswith(("tagger.tag", "tagger.demo", "tagger.training", "tagger.evaluation", "jobs")))
    assert wrong == []
