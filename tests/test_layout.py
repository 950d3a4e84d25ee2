"""The package's shape: no module imports another in a cycle, however the import is
written (at the top, inside a function, or for type checking only)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

import pytest_poolaware

PACKAGE = "pytest_poolaware"
ROOT = Path(pytest_poolaware.__file__).parent
#: Import edges that close a cycle today and are on their way out (none now).
KNOWN_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset()


def imports_of(path: Path) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # ``from .x import y`` (level 1) is ``from pytest_poolaware.x import y``.
            module = ".".join(filter(None, [PACKAGE if node.level else "", node.module or ""]))
            names = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            head, _, rest = name.partition(".")
            module = rest.split(".", 1)[0]
            if head == PACKAGE and (ROOT / f"{module}.py").exists():
                found.add(module)
    found.discard(path.stem)
    return found


def import_graph() -> dict[str, set[str]]:
    return {path.stem: imports_of(path) for path in sorted(ROOT.glob("*.py"))}


def test_the_graph_sees_imports_however_they_are_written() -> None:
    graph = import_graph()
    assert "link" in graph["scheduler"]  # at the top
    assert "scheduler" in graph["plugin"]  # inside a function and for type checking
    assert "settings" in graph["engine"]  # relative


def test_no_module_imports_another_in_a_cycle() -> None:
    graph = {
        module: {target for target in targets if (module, target) not in KNOWN_CYCLE_EDGES}
        for module, targets in import_graph().items()
    }
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
    assert set(order) == set(graph)
