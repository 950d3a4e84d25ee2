"""The package's shape: which part may import which (the layer rules), and no module
imports another in a cycle, however the import is written (at the top, inside a
function, or for type checking only). docs/design.md shows the same rules as a table,
checked here so it cannot drift."""

from __future__ import annotations

import ast
import graphlib
import shutil
from pathlib import Path

import pytest

import pytest_poolaware

PACKAGE = "pytest_poolaware"
ROOT = Path(pytest_poolaware.__file__).parent
DESIGN = Path(__file__).parent.parent / "docs" / "design.md"

#: The parts below the adapter, and the parts each may import besides itself. The
#: modules at the top of the package (the hooks, the xdist adapter, the engine helper)
#: may import any part; no part imports them.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "shared": frozenset(),
    "planning": frozenset({"shared"}),
    "worker": frozenset({"shared"}),
    "server": frozenset({"shared"}),
    "reporting": frozenset({"planning", "shared"}),
}
#: Third-party packages a part must never import, wherever the import is written.
NEVER_IMPORTS: dict[str, frozenset[str]] = {
    "planning": frozenset({"xdist", "execnet", "pytest", "psycopg", "asyncpg", "sqlalchemy"}),
    "reporting": frozenset({"xdist", "execnet", "psycopg", "asyncpg", "sqlalchemy"}),
    "worker": frozenset({"xdist"}),
}
ADAPTER = "adapter"


def module_name(root: Path, path: Path) -> str:
    """``planning/core.py`` is ``planning.core``; ``plugin.py`` is ``plugin``."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    head = module.split(".", 1)[0]
    return head if head in MAY_IMPORT else ADAPTER


def imported_names(path: Path, package_of_file: str) -> set[str]:
    """Every dotted name ``path`` imports, anywhere in the file, relative ones resolved."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # ``from . import x`` is relative to the file's own package
                anchor = package_of_file.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(filter(None, [*anchor, base]))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """The package's modules, each with the package's modules it imports."""
    modules = {module_name(root, path): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = ".".join([PACKAGE, *path.relative_to(root).parent.parts])
        targets: set[str] = set()
        for name in imported_names(path, package):
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                inner = name.removeprefix(PACKAGE).lstrip(".")
                # The longest prefix that is a module: ``x.y.Name`` imports ``x.y``.
                while inner and inner not in modules:
                    inner = inner.rpartition(".")[0]
                if inner and inner != module:
                    targets.add(inner)
        graph[module] = targets
    return graph


def third_party_imports(path: Path) -> set[str]:
    return {
        name.split(".", 1)[0]
        for name in imported_names(path, PACKAGE)
        if name and not name.startswith(PACKAGE)
    }


def layer_violations(root: Path = ROOT) -> list[str]:
    found = []
    for module, targets in import_graph(root).items():
        part = part_of(module)
        if part == ADAPTER:
            continue
        for target in sorted(targets):
            allowed = {part, *MAY_IMPORT[part]}
            if target and part_of(target) not in allowed:
                found.append(f"{module} imports {target}: {part} may import only {sorted(allowed)}")
    for path in sorted(root.rglob("*.py")):
        module = module_name(root, path)
        banned = NEVER_IMPORTS.get(part_of(module), frozenset()) & third_party_imports(path)
        found.extend(f"{module} imports {name}" for name in sorted(banned))
    return found


def layer_table() -> str:
    """The rules as docs/design.md shows them."""
    rows = ["| part | may import besides itself | never imports |", "|---|---|---|"]
    for part, allowed in MAY_IMPORT.items():
        never = ", ".join(f"`{name}`" for name in sorted(NEVER_IMPORTS.get(part, ()))) or "-"
        names = ", ".join(f"`{name}`" for name in sorted(allowed)) or "nothing"
        rows.append(f"| `{part}` | {names} | {never} |")
    return "\n".join(rows)


def test_the_graph_sees_imports_however_they_are_written() -> None:
    graph = import_graph()
    assert "shared.link" in graph["scheduler"]  # at the top
    assert "scheduler" in graph["plugin"]  # inside a function and for type checking
    assert "reporting.timeline" in graph["reporting.report"]  # ``from package import module``


def test_every_part_imports_only_the_parts_below_it() -> None:
    assert layer_violations() == []


def test_an_upward_import_planted_in_the_core_is_caught(tmp_path: Path) -> None:
    copy = tmp_path / PACKAGE
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    core = copy / "planning" / "core.py"
    core.write_text(core.read_text() + "\n\ndef _late() -> None:\n    import xdist\n")
    worker = copy / "worker" / "meter.py"
    worker.write_text(worker.read_text() + "\nfrom pytest_poolaware.server import room\n")
    assert layer_violations(copy) == [
        "worker.meter imports server: worker may import only ['shared', 'worker']",
        "worker.meter imports server.room: worker may import only ['shared', 'worker']",
        "planning.core imports xdist",
    ]


def test_the_design_notes_show_the_rules_the_test_holds() -> None:
    assert layer_table() in DESIGN.read_text(encoding="utf-8"), (
        "docs/design.md's layer table differs from the rules; it should read:\n" + layer_table()
    )


def test_no_module_imports_another_in_a_cycle() -> None:
    graph = import_graph()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
    assert set(order) == set(graph)
