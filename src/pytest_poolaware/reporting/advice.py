"""Marker advice: the tests whose measurements say they should be serial_only or parallel_safe."""

from __future__ import annotations

import ast
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from pytest_poolaware.reporting.runstats import Candidate, ItemFacts
from pytest_poolaware.shared.markers import PARALLEL_MARKER, SERIAL_MARKER

_DEFINITIONS: Final = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
#: ``serial_only`` advice is withheld when more than this share of the measured tests
#: would be candidates: the threshold then says that the budget is small, not that
#: those tests are heavy.
ADVICE_MAX_SHARE: Final = 0.1


def definition(nodeid: str) -> str:
    """The node id of the definition a marker goes on: ``f.py::test_a[1]`` -> ``f.py::test_a``."""
    bracket = nodeid.find("[")
    if bracket != -1 and "::" in nodeid[:bracket]:  # parameters, which may hold "::" too
        return nodeid[:bracket]
    head, sep, name = nodeid.rpartition("::")
    return f"{head}{sep}{name.split('[', 1)[0]}"


def advise(items: Sequence[ItemFacts], *, risky_need: int, idle_need: int) -> list[Candidate]:
    """``serial_only`` for unmarked tests that held ``risky_need`` connections or more at once;
    ``parallel_safe`` for ``serial_only`` tests that all held ``idle_need`` or fewer (a whole
    class at once when every test in it qualifies). Only measured items count."""
    groups: dict[str, list[ItemFacts]] = {}
    for item in items:
        groups.setdefault(definition(item.nodeid), []).append(item)
    serial: list[Candidate] = []
    parallel: dict[str, Candidate] = {}
    for target, members in groups.items():
        measured = [m for m in members if m.measured]
        if not measured:
            continue
        need = max(m.need or 0 for m in measured)
        unmarked = all(not m.markers.serial and not m.markers.parallel for m in members)
        if unmarked and need >= risky_need:
            serial.append(
                Candidate(
                    SERIAL_MARKER,
                    target,
                    need,
                    len(members),
                    f"unmarked, held {need} connections at once (advice from {risky_need})",
                )
            )
        all_serial = all(m.markers.serial and not m.markers.parallel for m in members)
        if all_serial and len(measured) == len(members) and need <= idle_need:
            held = "no connections" if need == 0 else f"at most {need} connections at once"
            parallel[target] = Candidate(
                PARALLEL_MARKER, target, need, len(members), f"serial_only, held {held}"
            )
    return serial + _by_class(parallel, groups)


def withheld(
    items: Sequence[ItemFacts], candidates: Sequence[Candidate], *, risky_need: int, budget: int
) -> str:
    """Why the ``serial_only`` candidates are not advised ("" when they are): more than
    ADVICE_MAX_SHARE of the measured tests would be."""
    measured = sum(1 for item in items if item.measured)
    heavy = sum(c.tests for c in candidates if c.marker == SERIAL_MARKER)
    if not heavy or heavy <= measured * ADVICE_MAX_SHARE:
        return ""
    return (
        f"{heavy} of {measured} tests held {risky_need} or more connections at once, more "
        f"than {ADVICE_MAX_SHARE:.0%} of them: the budget of {budget} is too small to tell "
        "heavy tests from the others (--poolaware-risky-need sets the threshold)"
    )


def advised(candidates: Sequence[Candidate], withheld_because: str) -> list[Candidate]:
    """The candidates to advise: without the ``serial_only`` ones when they are withheld."""
    if not withheld_because:
        return list(candidates)
    return [c for c in candidates if c.marker != SERIAL_MARKER]


def _by_class(
    candidates: dict[str, Candidate], groups: dict[str, list[ItemFacts]]
) -> list[Candidate]:
    """One candidate per class whose every test is a candidate; the others as they are."""
    classes: dict[str, list[str]] = {}
    for target in groups:
        container = target.rpartition("::")[0]
        if "::" in container:  # a class (a module's definitions stay one by one)
            classes.setdefault(container, []).append(target)
    merged: list[Candidate] = []
    done: set[str] = set()
    for target, candidate in candidates.items():
        container = target.rpartition("::")[0]
        members = classes.get(container, [])
        if target in done:
            continue
        if len(members) > 1 and all(m in candidates for m in members):
            need = max(candidates[m].need for m in members)
            tests = sum(candidates[m].tests for m in members)
            held = "no connections" if need == 0 else f"at most {need} connections at once"
            merged.append(
                Candidate(PARALLEL_MARKER, container, need, tests, f"serial_only, held {held}")
            )
            done.update(members)
        else:
            merged.append(candidate)
    return merged


def locate(
    root: Path, target: str, cache: dict[Path, ast.Module | None] | None = None
) -> int | None:
    """Line of the ``def``/``class`` a node id names, read from its source; None if unsure."""
    path_part, *names = target.split("::")
    path = root / path_part
    parsed = cache if cache is not None else {}
    if path not in parsed:
        try:
            parsed[path] = ast.parse(path.read_bytes(), filename=str(path))
        except (OSError, SyntaxError, ValueError):
            parsed[path] = None
    tree = parsed[path]
    if tree is None or not names:
        return None
    body: list[ast.stmt] = tree.body
    line = None
    for name in names:
        found = next((n for n in body if isinstance(n, _DEFINITIONS) and n.name == name), None)
        if found is None:
            return None
        body, line = found.body, found.lineno
    return line


def advice_text(
    candidates: Sequence[Candidate],
    *,
    root: Path,
    shown_from: Path,
    budget: int,
    risky_need: int,
    idle_need: int,
    withheld_because: str = "",
) -> str:
    """The ``--poolaware-advice`` file: ``file:line: @pytest.mark.X  # why`` per candidate,
    paths relative to ``shown_from`` (where pytest was started) when below it."""
    serial = (
        f"none: {withheld_because}"
        if withheld_because
        else f"unmarked tests that held >= {risky_need} connections at once (budget {budget})"
    )
    lines = [
        "# pytest-poolaware marker advice",
        f"# serial_only: {serial}",
        f"# parallel_safe: serial_only tests that held <= {idle_need} connections at once; "
        "keep serial_only if they share something else (an external service, files)",
        "# file:line: the marker to put on the def or class at that line  # why",
    ]
    cache: dict[Path, ast.Module | None] = {}
    for candidate in advised(candidates, withheld_because):
        path_part, _, name = candidate.target.partition("::")
        path = root / path_part
        shown = os.path.relpath(path, shown_from) if path.is_relative_to(shown_from) else str(path)
        line = locate(root, candidate.target, cache)
        where = f"{shown}:{line}" if line is not None else shown
        action = f"@pytest.mark.{candidate.marker}"
        if candidate.marker == PARALLEL_MARKER:
            action += f" (instead of {SERIAL_MARKER})"
        lines.append(f"{where}: {action}  # {name}: {candidate.reason}")
    return "\n".join(lines) + "\n"
