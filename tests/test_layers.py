"""The import graph of ps3edge/: no cycles, and no module imports from a layer above its own.

Every `import` and `from ... import` counts, those inside functions too (a function-level import
hides a cycle from Python, not from a reader). Run it alone with `python -m pytest -q tests/test_layers.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ps3edge"

# (module prefix, layer), lowest first; a module belongs to its longest matching prefix and may
# import only from its own layer or those below. docs/architecture.md#layout states the same order.
LAYERS = (
    ("ps3edge.version", 0), ("ps3edge.errors", 0), ("ps3edge.defaults", 0), ("ps3edge.metrics", 0),
    ("ps3edge.artifact.io", 0), ("ps3edge.paths", 0), ("ps3edge.stopsignal", 0),
    ("ps3edge.model", 1),
    ("ps3edge.artifact", 2),
    ("ps3edge.exporter", 3),
    ("ps3edge.calibration.precision", 4),
    ("ps3edge.engines", 5),
    ("ps3edge.runtime", 6),
    ("ps3edge.compare", 7), ("ps3edge.demo", 7), ("ps3edge.calibration", 7),
    ("ps3edge.llm", 8),
    ("ps3edge.api", 9),
    ("ps3edge.parity", 10), ("ps3edge.bench", 10), ("ps3edge.throughput", 10), ("ps3edge.doctor", 10),
    ("ps3edge.reference", 10), ("ps3edge.serve", 10), ("ps3edge.extract", 10), ("ps3edge.streaming", 10),
    ("ps3edge.openai_api", 10),
    ("ps3edge.cli", 11),
)
# The package itself (ps3edge/__init__.py) is the public face: it re-exports the API, so it sits
# on top; nothing inside the package imports it.
FACADE = ("ps3edge", 12)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The ps3edge modules `name` imports (a `from pkg import mod` names the module mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def layer(name: str) -> int:
    if name == FACADE[0]:
        return FACADE[1]
    matches = [(len(prefix), rank) for prefix, rank in LAYERS if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} is in no layer: add it to LAYERS (and to docs/architecture.md's layout)"
    return max(matches)[1]


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def test_no_module_imports_from_a_higher_layer():
    upward = sorted(f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
                    for a, targets in graph().items() for b in targets if layer(b) > layer(a))
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}           # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)
