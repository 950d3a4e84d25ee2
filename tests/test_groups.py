"""End to end: ``xdist_group`` tests run on one worker, in collection order, as with
``--dist loadgroup``, and their node ids stay as they are.

The suite's groups share process state: a group's first test starts a sequence in a
helper module, and each later test checks that every earlier step of its group ran in
the same process, in order. One group spans the first and the last module, one four
middle modules, others sit in one module (marked on the module, a class, or combined
from two marks); one mixes a ``serial_only`` test with an unmarked one; ungrouped tests,
some using the database, fill every module.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pytest
from inner import ENGINE_CONFTEST, poolaware_run, run

WORKERS = "4"
MODULE_COUNT = 10
#: Ungrouped tests in each module (the odd ones use the database).
FILLERS = 4

GROUP_STATE = """
import os

#: Steps each group has run in this process (one worker): the state the groups share.
STEPS = {}


def step(group, number):
    if os.environ.get("GROUP_STEP_FAILS") == f"{group}_{number}":
        raise AssertionError(f"{group}_{number} fails as asked")
    done = STEPS.get(group, 0)
    assert done == number, (
        f"{group}: step {number} ran after {done} steps of the group in process {os.getpid()}"
    )
    STEPS[group] = number + 1
"""

#: (module, group, its steps in that module): each group's steps in collection order.
STEPS = [
    (0, "span", (0, 1)),
    (9, "span", (2, 3)),
    (3, "middle", (0, 1)),
    (4, "middle", (2, 3)),
    (5, "middle", (4, 5)),
    (6, "middle", (6, 7)),
    (2, "lane", (0,)),
    (5, "lane", (1,)),
    (2, "combo_a_combo_b", (0,)),
    (8, "combo_a_combo_b", (1, 2)),
]
#: Groups marked in one module: on the module (``pytestmark``) or on a class.
MODULE_GROUP = (1, "whole_module", 3)
CLASS_GROUP = (7, "whole_class", 3)


def group_test(group: str, number: int) -> str:
    """One step of a group, marked as ``loadgroup`` users mark it (``combo_a_combo_b``:
    two marks that xdist combines, both on the test or one on its class; ``lane``: its
    first step is ``serial_only``)."""
    if group == "combo_a_combo_b":
        marks = ['@pytest.mark.xdist_group(name="combo_a")']
        if number == 0:
            marks.append('@pytest.mark.xdist_group("combo_b")')
        else:  # the other mark on its class
            return "\n".join(
                [
                    '@pytest.mark.xdist_group("combo_b")',
                    f"class TestCombined{number}:",
                    *(f"    {mark}" for mark in marks),
                    f"    def test_{group}_{number}(self):",
                    f'        groupstate.step("{group}", {number})',
                    "",
                ]
            )
    else:
        marks = [f'@pytest.mark.xdist_group(name="{group}")']
        if group == "lane" and number == 0:
            marks.append("@pytest.mark.serial_only")
    return "\n".join(
        [*marks, f"def test_{group}_{number}():", f'    groupstate.step("{group}", {number})', ""]
    )


def filler_tests() -> str:
    return "\n".join(
        f"def test_filler_{n}({'engine' if n % 2 else ''}):\n"
        + (
            "    with engine.connect() as conn:\n        conn.execute(text('select 1'))\n"
            if n % 2
            else "    pass\n"
        )
        for n in range(FILLERS)
    )


def module_source(number: int) -> str:
    lines = ["import pytest", "from sqlalchemy import text", "import groupstate", ""]
    module, group, count = MODULE_GROUP
    if number == module:
        lines += [f'pytestmark = pytest.mark.xdist_group("{group}")', ""]
        lines += [
            f'def test_{group}_{n}():\n    groupstate.step("{group}", {n})\n' for n in range(count)
        ]
    module, group, count = CLASS_GROUP
    if number == module:
        lines += [f'@pytest.mark.xdist_group("{group}")', "class TestTogether:"]
        lines += [
            f'    def test_{group}_{n}(self):\n        groupstate.step("{group}", {n})\n'
            for n in range(count)
        ]
    for module, group, numbers in STEPS:
        if module == number:
            lines += [group_test(group, n) for n in numbers]
    lines.append(filler_tests())
    return "\n".join(lines)


GROUPS = {group for _, group, _ in STEPS} | {MODULE_GROUP[1], CLASS_GROUP[1]}
GROUPED = sum(len(numbers) for _, _, numbers in STEPS) + MODULE_GROUP[2] + CLASS_GROUP[2]
TESTS = GROUPED + MODULE_COUNT * FILLERS


@pytest.fixture
def grouped_suite(
    pytester: pytest.Pytester, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    monkeypatch.setenv("POOLAWARE_DSN", postgres_dsn)
    pytester.makeconftest(ENGINE_CONFTEST)
    modules = {f"test_m{n:02}": module_source(n) for n in range(MODULE_COUNT)}
    pytester.makepyfile(groupstate=GROUP_STATE, **modules)
    return pytester


def poolaware(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict[str, Any]]:
    """One poolaware run; its result and JSON report."""
    return poolaware_run(pytester, WORKERS, *args)


def workers_by_group(report: dict[str, Any]) -> dict[str, set[str]]:
    workers: defaultdict[str, set[str]] = defaultdict(set)
    for test in report["tests"]:
        if test["xdist_group"]:
            workers[test["xdist_group"]].add(test["worker"])
    return dict(workers)


def grouped_correctly(report: dict[str, Any]) -> None:
    """Each group ran on one worker; node ids carry no group; the mixed group ran in the
    serial lane."""
    assert workers_by_group(report).keys() == GROUPS
    for group, workers in workers_by_group(report).items():
        assert len(workers) == 1, (group, workers)
    assert not any("@" in test["nodeid"] for test in report["tests"])
    lanes = {test["lane"] for test in report["tests"] if test["xdist_group"] == "lane"}
    assert lanes == {"serial"}


def test_groups_sharing_process_state_pass_under_poolaware_cold_and_warm(
    grouped_suite: pytest.Pytester,
) -> None:
    result, cold = poolaware(grouped_suite, "--cache-clear")
    result.assert_outcomes(passed=TESTS)
    grouped_correctly(cold)
    assert cold["run"]["learned"] == 0

    result, warm = poolaware(grouped_suite)
    result.assert_outcomes(passed=TESTS)
    grouped_correctly(warm)
    assert warm["run"]["learned"] == TESTS


def test_node_ids_of_grouped_tests_are_kept_for_deselect_and_last_failed(
    grouped_suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``loadgroup`` appended the group to node ids; poolaware never changes them, so
    ``--deselect`` and ``--lf`` name tests as the user sees them, and ``--lf`` reruns a
    failed group on one worker, in order."""
    middle = [
        f"test_m{m:02}.py::test_middle_{n}"
        for m, group, ns in STEPS
        if group == "middle"
        for n in ns
    ]
    monkeypatch.setenv("GROUP_STEP_FAILS", "middle_0")  # the group's later steps fail too
    result, data = poolaware(grouped_suite, "--deselect", "test_m09.py::test_span_3")
    result.assert_outcomes(passed=TESTS - len(middle) - 1, failed=len(middle))
    assert "test_m09.py::test_span_3" not in {test["nodeid"] for test in data["tests"]}
    lastfailed = grouped_suite.path / ".pytest_cache" / "v" / "cache" / "lastfailed"
    assert sorted(json.loads(lastfailed.read_text())) == sorted(middle)

    monkeypatch.delenv("GROUP_STEP_FAILS")
    result, data = poolaware(grouped_suite, "--lf")
    result.assert_outcomes(passed=len(middle))
    assert [test["nodeid"] for test in data["tests"]] == middle
    assert workers_by_group(data) == {"middle": {data["tests"][0]["worker"]}}


def test_the_same_suite_fails_under_load(grouped_suite: pytest.Pytester) -> None:
    """The groups' shared state is real: spread over workers, later steps fail."""
    result = run(grouped_suite, "-n", WORKERS, "--dist", "load")
    assert result.parseoutcomes().get("failed", 0) > 0
    result.stdout.fnmatch_lines(["*: step * ran after * steps of the group in process *"])
