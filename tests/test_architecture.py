"""The package's shape (docs/architecture.md): its import graph has no cycle, every module belongs to
a layer and imports only from its own layer or lower ones, and the leaves stay leaves.

Every import counts: top level, inside functions and under ``TYPE_CHECKING`` alike (a lazy import
that closes a cycle still ties the two modules together). The graph is read from the source with
``ast``, so the test needs no import of tclab.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tclab"

#: Modules that import nothing from tclab (torch, diffusers and the standard library only).
LEAVES = ("tclab.steps", "tclab.report", "tclab.env", "tclab.cache.registry", "tclab.anatomy", "tclab.stats")

#: The layers of docs/architecture.md, lowest first. A module imports only from its layer or lower ones;
#: a new module must be placed here (the test says so), which is the moment to decide where it belongs.
LAYERS = [
    ("leaves", ["tclab.env", "tclab.steps", "tclab.anatomy", "tclab.report", "tclab.cache.registry",
                "tclab.cache.schedule", "tclab.cache.select", "tclab.cache.static", "tclab.cache.forecast",
                "tclab.stats", "tclab.record_store", "tclab.files", "tclab.sweep_summary"]),
    ("ground", ["tclab.progress", "tclab.shapes", "tclab.paths", "tclab.data", "tclab.distributed"]),
    ("models", ["tclab.models", "tclab.labels", "tclab.classifier", "tclab.artefacts"]),
    ("engine", ["tclab.sampling", "tclab.record", "tclab.train_dit", "tclab.cache", "tclab.cache.config",
                "tclab.cache.scorers", "tclab.cache.methods", "tclab.cache.hooks", "tclab.cache.predictor",
                "tclab.cache.peers", "tclab.cache.peers.*"]),
    ("measurement", ["tclab.metrics", "tclab.features", "tclab.lpips", "tclab.cache.train"]),
    ("run folders", ["tclab.runs", "tclab.runs.*"]),
    ("studies", ["tclab.analysis", "tclab.prepare", "tclab.evaluate", "tclab.ablation",
                 "tclab.inhouse", "tclab.plots", "tclab.explore", "tclab.gates",
                 "tclab.rating", "tclab.rating_widget"]),
    ("front ends", ["tclab.jobs", "tclab.cli", "tclab.__main__"]),
]


def layer_of(module: str) -> int | None:
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if module == m or (m.endswith(".*") and module.startswith(m[:-1])):
                return i
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """tclab module -> the tclab modules it imports (a package's ``__init__`` is the package's name)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # `from . import runs` imports the submodule; `from .x import name` imports x
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names]
            else:
                continue
            for target in targets:
                while target not in files and "." in target:
                    target = target.rpartition(".")[0]
                if target in files and target != name and target != "tclab":
                    deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_is_read_from_every_kind_of_import():
    graph = import_graph()
    assert "tclab.steps" in graph["tclab.sampling"]  # a top-level relative import
    assert "tclab.runs" in graph["tclab.cli"] or any(d.startswith("tclab.runs") for d in graph["tclab.cli"])


def test_tclab_has_no_import_cycle():
    found = cycles(import_graph())
    graph = import_graph()
    detail = "\n".join(f"  {' <-> '.join(c)}:\n" + "\n".join(f"    {m} -> {sorted(d for d in graph[m] if d in c)}"
                                                              for m in c) for c in found)
    assert not found, f"import cycles in tclab/ (lower layers must not import upper ones):\n{detail}"


def test_the_leaves_import_nothing_from_tclab():
    graph = import_graph()
    for leaf in LEAVES:
        assert leaf in graph, f"{leaf} is gone: update LEAVES"
        assert not graph[leaf], f"{leaf} is a leaf module but imports {sorted(graph[leaf])}"


def test_every_module_has_a_layer_and_imports_only_downwards():
    graph = import_graph()
    unplaced = sorted(m for m in graph if m != "tclab" and layer_of(m) is None)
    assert not unplaced, f"modules in no layer of LAYERS (tests/test_architecture.py, docs/architecture.md): {unplaced}"
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m in sorted(graph) if m != "tclab" for d in sorted(graph[m]) if layer_of(d) > layer_of(m)]
    assert not upward, "imports from a higher layer:\n  " + "\n  ".join(upward)
