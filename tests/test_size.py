"""Size by rule: no module, class or function grows past what a reader takes in at once.

Only code lines count: docstrings, comments and blank lines never do, so the rule is met
by splitting code, never by deleting the explanations. (Branching and statement counts
are ruff's: C901, PLR0912 and PLR0915 at their defaults, in pyproject.toml.)
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

import pytest_poolaware

ROOT = Path(pytest_poolaware.__file__).parent
#: Code lines at most, per kind of block.
MOST_CODE_LINES = {"module": 400, "class": 200, "function": 50}


def text_lines(tree: ast.AST) -> set[int]:
    """Lines of docstrings and other bare strings (the explanations)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


@functools.cache
def explanation_lines(source: str) -> frozenset[int]:
    """``text_lines`` of a module's source, parsed once for all its blocks."""
    return frozenset(text_lines(ast.parse(source)))


def code_lines(source: str, first: int = 1, last: int | None = None) -> int:
    """How many of lines ``first`` to ``last`` hold code."""
    explanations = explanation_lines(source)
    lines = source.splitlines()
    return sum(
        1
        for number, line in enumerate(lines[first - 1 : last], start=first)
        if line.strip() and not line.strip().startswith("#") and number not in explanations
    )


def oversized(root: Path) -> Iterator[tuple[str, str]]:
    """Each block over its kind's limit: the kind, and the block named."""
    for path in sorted(root.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        name = path.relative_to(root).as_posix()
        if (count := code_lines(source)) > MOST_CODE_LINES["module"]:
            yield "module", f"{name}: {count} code lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                kind = "class"
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = "function"
            else:
                continue
            count = code_lines(source, node.lineno, node.end_lineno)
            if count > MOST_CODE_LINES[kind]:
                yield kind, f"{name}: {kind} {node.name}, {count} code lines"


def test_code_lines_leave_explanations_out() -> None:
    source = '"""A module."""\n\n# why\ndef f() -> int:\n    """Doc\n    string."""\n    return 1\n'
    assert code_lines(source) == 2


def test_an_oversized_function_is_named(tmp_path: Path) -> None:
    body = "".join(f"    x{n} = {n}\n" for n in range(51))
    (tmp_path / "big.py").write_text(f"def grown() -> None:\n{body}")
    assert list(oversized(tmp_path)) == [("function", "big.py: function grown, 52 code lines")]


@pytest.mark.parametrize("kind", sorted(MOST_CODE_LINES))
def test_nothing_in_the_package_outgrows_the_rule(kind: str) -> None:
    assert [block for found, block in oversized(ROOT) if found == kind] == []
