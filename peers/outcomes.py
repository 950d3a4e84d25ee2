"""Outcomes of a run, per test, from its junitxml; and how two runs of one suite differ.

Pure: no server, no pytest run, no download, so that ``tests/test_peers.py`` can check
the comparison itself. Counts hide what matters (one test failing and another passing
in its place add up the same), so runs are compared test by test.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

PASSED: Final = "passed"
#: junitxml's child elements of a ``testcase`` and the outcome each stands for.
OUTCOME_OF_ELEMENT: Final = {"failure": "failed", "error": "error", "skipped": "skipped"}
#: What a test that one run has and the other has not is shown as.
ABSENT: Final = "absent"
#: The entry junitxml gives a run that ended in an INTERNALERROR: not one of the suite's tests.
INTERNAL_ERROR: Final = "pytest::internal"
INTERNAL_ERROR_SHOWN: Final = "INTERNALERROR"
#: Differing tests listed by name; the rest are counted.
MAX_LISTED: Final = 40


def case_id(classname: str, name: str) -> str:
    """A test's name as the junitxml gives it (``test.sql.test_query.QueryTest::test_x``)."""
    return f"{classname}::{name}" if classname else name


def outcome_of(testcase: ET.Element) -> str:
    """``passed``, ``failed``, ``error``, ``skipped``, or e.g. ``failed+error`` for a test
    that failed and then errored in its teardown."""
    kinds = sorted({OUTCOME_OF_ELEMENT[c.tag] for c in testcase if c.tag in OUTCOME_OF_ELEMENT})
    return "+".join(kinds) if kinds else PASSED


def parse_junit(text: str) -> dict[str, str]:
    """Each test's outcome; a test listed twice gets its outcomes joined (``passed+error``).

    Raises ``xml.etree.ElementTree.ParseError`` on a file that is not junitxml.
    """
    outcomes: dict[str, str] = {}
    for testcase in ET.fromstring(text).iter("testcase"):
        key = case_id(testcase.get("classname", ""), testcase.get("name", ""))
        outcome = outcome_of(testcase)
        outcomes[key] = f"{outcomes[key]}+{outcome}" if key in outcomes else outcome
    return outcomes


def read_junit(path: Path) -> dict[str, str]:
    """:func:`parse_junit` of a file (``OSError`` when there is none)."""
    return parse_junit(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class RunOutcomes:
    """One run of a suite: its name, pytest's exit status, each test's outcome."""

    label: str
    exit_status: int
    outcomes: Mapping[str, str]
    #: Why the outcomes are missing or partial (no junitxml written, a timeout...), or "".
    note: str = ""

    @property
    def tests(self) -> dict[str, str]:
        """The suite's tests and their outcomes: the outcomes but pytest's own entry."""
        return {test: outcome for test, outcome in self.outcomes.items() if test != INTERNAL_ERROR}

    @property
    def internal_error(self) -> bool:
        """Whether pytest stopped with an INTERNALERROR (and wrote it into the junitxml)."""
        return INTERNAL_ERROR in self.outcomes

    def ending(self) -> str:
        """``exit status 3 (INTERNALERROR, no junitxml written)``: how the run stopped."""
        why = ([INTERNAL_ERROR_SHOWN] if self.internal_error else []) + [self.note]
        shown = ", ".join(part for part in why if part)
        return f"exit status {self.exit_status}" + (f" ({shown})" if shown else "")

    def tally(self) -> str:
        """``3120 tests: 2900 passed, 220 skipped``, for the summary."""
        counts = Counter(self.tests.values())
        parts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
        ending = ", INTERNALERROR" if self.internal_error else ""
        return f"{len(self.tests)} tests" + (f": {parts}" if parts else "") + ending


@dataclass(frozen=True)
class Difference:
    """A test whose outcome differs between the reference run and another."""

    test: str
    expected: str
    found: str


def differing_tests(reference: Mapping[str, str], other: Mapping[str, str]) -> list[Difference]:
    """Every test whose outcome differs, a test missing from either side included; sorted."""
    return [
        Difference(test, reference.get(test, ABSENT), other.get(test, ABSENT))
        for test in sorted(reference.keys() | other.keys())
        if reference.get(test, ABSENT) != other.get(test, ABSENT)
    ]


def no_test_ran(run: RunOutcomes) -> str:
    """The line for a run without a single test of the suite."""
    return f"{run.label}: no test ran, {run.ending()}"


def problems(reference: RunOutcomes, other: RunOutcomes) -> list[str]:
    """What makes ``other`` not a run like ``reference``, as lines to print; [] when alike.

    A run without a single test is reported as such rather than as thousands of absent
    tests; otherwise the test count, the exit status and each differing test are checked.
    """
    found = [no_test_ran(run) for run in (reference, other) if not run.tests]
    if found:
        return found
    if len(other.tests) != len(reference.tests):
        counts = f"{len(other.tests)} tests, {reference.label}: {len(reference.tests)} tests"
        found.append(f"{other.label}: {counts}")
    if other.exit_status != reference.exit_status:
        found.append(
            f"{other.label}: exit status {other.exit_status}, "
            f"{reference.label}: {reference.exit_status}"
        )
    if other.internal_error and not reference.internal_error:
        found.append(f"{other.label}: ended in an {INTERNAL_ERROR_SHOWN}")
    differences = differing_tests(reference.tests, other.tests)
    if differences:
        found.append(f"{other.label}: {len(differences)} tests differ from {reference.label}:")
        found += describe(differences, reference.label, other.label)
    return found


def compare_runs(reference: RunOutcomes, others: Sequence[RunOutcomes]) -> list[str]:
    """:func:`problems` of each other run against the reference, an empty reference once."""
    if not reference.tests:
        return [no_test_ran(run) for run in (reference, *others) if not run.tests]
    return [line for run in others for line in problems(reference, run)]


def describe(differences: Iterable[Difference], expected_label: str, found_label: str) -> list[str]:
    """One indented line per differing test, at most :data:`MAX_LISTED`, then a count."""
    listed = list(differences)
    lines = [
        f"    {d.test}: {expected_label} {d.expected}, {found_label} {d.found}"
        for d in listed[:MAX_LISTED]
    ]
    if len(listed) > MAX_LISTED:
        lines.append(f"    ... and {len(listed) - MAX_LISTED} more")
    return lines
