"""No module outside the registries asks which backend it holds: what a backend needs and can do
is stated by the backend (runtime/runners/registry.py, its session, session.py) and by the
VILA-HD implementations (llm/implementations.py), never found by comparing a name.

Read with ast, not grep: a comparison is an `ast.Compare` (==, !=, in, not in, is) with a backend
name among its operands, as a string or inside a tuple, list or set display; a `match` case on a
backend name counts too. Choosing a backend by its name (get_backend("torch"), a default
argument, a message) is no comparison and is allowed. Run it alone with
`python -m pytest -q tests/test_backend_names.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ps3edge"
BACKEND_NAMES = {"onnxruntime", "torch", "tensorrt"}
# the places that map names to backends, and decide by them
REGISTRIES = (PACKAGE / "runtime" / "runners", PACKAGE / "llm" / "implementations.py")


def _names_in(node: ast.AST) -> set[str]:
    """Backend names a comparison operand spells: a string, or strings in a tuple / list / set."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & BACKEND_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_names_in(e) for e in node.elts)) if node.elts else set()
    return set()


def name_comparisons(source: str) -> list[tuple[int, str]]:
    """(line, backend name) of every comparison against a backend name in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                found += [(node.lineno, name) for name in sorted(_names_in(operand))]
        elif isinstance(node, ast.match_case):
            for pattern in ast.walk(node.pattern):
                if isinstance(pattern, ast.MatchValue):
                    found += [(pattern.lineno, name) for name in sorted(_names_in(pattern.value))]
    return found


def _in_registry(path: Path) -> bool:
    return any(path == r or r in path.parents for r in REGISTRIES)


def test_no_module_outside_the_registries_compares_a_backend_name():
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line} compares with '{name}'"
                 for path in sorted(PACKAGE.rglob("*.py")) if not _in_registry(path)
                 for line, name in name_comparisons(path.read_text())]
    assert not offenders, ("ask the backend (registry.Backend's attributes, its session) or the VILA-HD "
                           "implementation instead:\n" + "\n".join(offenders))


def test_the_check_sees_every_form_of_comparison():
    source = '''
if backend == "torch": pass
if "tensorrt" != name: pass
if backend in ("onnxruntime", "tensorrt"): pass
if backend != ["onnxruntime"]: pass
if x is "torch": pass
match backend:
    case "tensorrt": pass
'''
    assert [name for _, name in name_comparisons(source)] == [
        "torch", "tensorrt", "onnxruntime", "tensorrt", "onnxruntime", "torch", "tensorrt"]
    allowed = '''
get_backend("torch")
Pipeline(art, "onnxruntime", device="cpu")
if precision == "fp32" and kind in ("cpu", "cuda") and via == "torch-tensorrt": pass
raise Ps3EdgeError("--device applies to the torch backend")
'''
    assert name_comparisons(allowed) == []
