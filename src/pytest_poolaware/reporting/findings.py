"""The summary's warnings and reruns in few lines, whatever the suite's size: one line per
cause, with how many tests, the first few of them, and the cause in plain words (``-v`` and
the JSON report list every test).

Pure: no pytest, no xdist, no database.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from pytest_poolaware.planning.admission import Overrun

#: Tests named on a grouped line by default; the others are counted ("and 12 more").
SHOWN_TESTS: Final = 3
#: Indentation of the per-test lines ``-v`` adds under a grouped line.
INDENT: Final = "  "


class Cause(enum.Enum):
    """Why a test ran past the budget."""

    #: It needed more connections at once than the whole budget.
    TOO_BIG = "too_big"
    #: Workers kept connections open between tests (a persistent connection, a pool's
    #: idle ones that could not be given back), so its need found no room.
    KEPT_OPEN = "kept_open"
    #: The other tests held the rest of the budget and none could end first.
    CROWDED = "crowded"


def cause_of(overrun: Overrun) -> Cause:
    if overrun.need > overrun.budget:
        return Cause.TOO_BIG
    if sum(overrun.outside) > 0:
        return Cause.KEPT_OPEN
    return Cause.CROWDED


def kept_open_words(outside: Sequence[int]) -> str:
    """``4 workers each keep a connection open between tests``."""
    workers, total = len(outside), sum(outside)
    if workers == 1:
        return f"a worker keeps {_connections(total)} open between tests"
    if len(set(outside)) == 1:
        each = "a connection" if outside[0] == 1 else f"{outside[0]} connections"
        return f"{workers} workers each keep {each} open between tests"
    return f"{workers} workers keep {total} connections open between tests"


def why(overrun: Overrun) -> str:
    """The cause of one overrun in plain words (the JSON report's ``why``)."""
    cause = cause_of(overrun)
    if cause is Cause.TOO_BIG:
        return (
            f"it needed {_connections(overrun.need)} at once, more than the whole budget "
            f"of {overrun.budget}"
        )
    if cause is Cause.KEPT_OPEN:
        return f"{kept_open_words(overrun.outside)}; the budget is {overrun.budget}"
    held = f" ({overrun.in_tests})" if overrun.in_tests else ""
    return (
        f"the other tests held the rest of the budget of {overrun.budget}{held} "
        "and none could end first"
    )


def overrun_warnings(
    overruns: Sequence[Overrun], nodeid_of: Callable[[Overrun], str], *, verbose: bool = False
) -> list[str]:
    """One warning line per cause (in the order the causes first occurred); with
    ``verbose``, every test below its line with its own cause."""
    groups: dict[Cause, list[Overrun]] = {}
    for overrun in overruns:
        groups.setdefault(cause_of(overrun), []).append(overrun)
    lines = []
    for cause, group in groups.items():
        lines.append("WARNING: " + _group_line(cause, group, nodeid_of))
        if verbose and len(group) > 1:
            lines += [f"{INDENT}{nodeid_of(o)}: {why(o)}" for o in group]
    return lines


def _group_line(cause: Cause, group: list[Overrun], nodeid_of: Callable[[Overrun], str]) -> str:
    if cause is Cause.TOO_BIG:
        if len(group) == 1:
            o = group[0]
            where = "alone" if o.alone else "beside other tests"
            return (
                f"{nodeid_of(o)} needed {o.need} connections, more than the whole budget of "
                f"{o.budget}; it ran {where}"
            )
        names = [f"{nodeid_of(o)} ({o.need})" for o in group]
        beside = sum(1 for o in group if not o.alone)
        where = "they ran alone" if not beside else f"{beside} of them ran beside other tests"
        return (
            f"{len(group)} tests needed more connections at once than the whole budget "
            f"{_budgets(group)}: {_first(names)}; {where}"
        )
    names = [nodeid_of(o) for o in group]
    tests = names[0] if len(group) == 1 else f"{len(group)} tests"
    if cause is Cause.KEPT_OPEN:
        # The moment most was kept open says it best: that is what crowded the budget.
        worst = max(group, key=lambda o: (sum(o.outside), len(o.outside)))
        return (
            f"{tests} ran past the budget: {kept_open_words(worst.outside)}; the budget is "
            f"{worst.budget}{_examples(names)}"
        )
    return (
        f"{tests} ran past the budget {_budgets(group)}: the other tests held the rest of it "
        f"and none could end first{_examples(names)}"
    )


@dataclass(frozen=True)
class Stall:
    """A connect kept waiting at the gate while the budget had room for it: a fault of
    the plugin's own, never the budget doing its work (``gate_watch`` judges them)."""

    worker: str
    #: The test it was for (its index in the collection); -1 outside any test.
    item: int
    #: Seconds it waited, as the controller saw it.
    waited: float
    #: Why, in words ("the server's room was being read").
    cause: str
    #: The worker stopped waiting (its gate timed out) and connected anyway.
    gave_up: bool = False


def stall_warnings(
    stalls: Sequence[Stall], nodeid_of: Callable[[int], str], *, verbose: bool = False
) -> list[str]:
    """One warning line per cause: how many connects, the longest wait, the first few
    tests (all of them with ``verbose``)."""
    groups: dict[str, list[Stall]] = {}
    for stall in stalls:
        groups.setdefault(stall.cause, []).append(stall)
    lines = []
    for cause, group in groups.items():
        where = [_stalled(stall, nodeid_of) for stall in group]
        connects = "a connect" if len(group) == 1 else f"{len(group)} connects"
        longest = max(stall.waited for stall in group)
        lines.append(
            f"WARNING: fault: {connects} waited at the gate up to {longest:.1f}s though the "
            f"budget had room ({_first(where)}): {cause}"
        )
        if verbose and len(group) > 1:
            lines += [f"{INDENT}{w}: {s.waited:.1f}s" for w, s in zip(where, group, strict=True)]
    return lines


def _stalled(stall: Stall, nodeid_of: Callable[[int], str]) -> str:
    where = "outside tests" if stall.item < 0 else nodeid_of(stall.item)
    return f"{stall.worker} {where}"


def rerun_lines(reruns: Sequence[tuple[str, str]], *, verbose: bool = False) -> list[str]:
    """``rerun alone (why): nodeid`` for a reason with one test; ``rerun alone (why): 5
    tests: a, b, c and 2 more`` for one with several (all of them with ``verbose``)."""
    groups: dict[str, list[str]] = {}
    for nodeid, reason in reruns:
        groups.setdefault(reason, []).append(nodeid)
    lines = []
    for reason, nodeids in groups.items():
        if len(nodeids) == 1:
            lines.append(f"rerun alone ({reason}): {nodeids[0]}")
        elif verbose:
            lines.append(f"rerun alone ({reason}): {len(nodeids)} tests:")
            lines += [f"{INDENT}{nodeid}" for nodeid in nodeids]
        else:
            lines.append(f"rerun alone ({reason}): {len(nodeids)} tests: {_first(nodeids)}")
    return lines


def _first(names: Sequence[str], hint: str = " (-v lists them)") -> str:
    """The first SHOWN_TESTS names, and how many more (``-v`` lists them)."""
    shown = ", ".join(names[:SHOWN_TESTS])
    rest = len(names) - SHOWN_TESTS
    return shown if rest <= 0 else f"{shown} and {rest} more{hint}"


def _examples(names: Sequence[str]) -> str:
    """`` (a, b, c and 8 more; -v lists them)`` after a line naming a group of tests."""
    return "" if len(names) == 1 else f" ({_first(names, '; -v lists them')})"


def _budgets(group: Sequence[Overrun]) -> str:
    """``of 3``, or ``of 2 to 3`` when the budget moved between them."""
    low = min(o.budget for o in group)
    high = max(o.budget for o in group)
    return f"of {low}" if low == high else f"of {low} to {high}"


def _connections(count: int) -> str:
    return "a connection" if count == 1 else f"{count} connections"
