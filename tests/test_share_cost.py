"""What sharing the server cost a run, as users read it: the summary's sharing line (how
long other runs held it back, and the test held back longest), the JSON report's
seconds per test and in all, and the trace's spans of those waits. Pure."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, cast

from tracecheck import problems

from pytest_poolaware.planning.core import Lane
from pytest_poolaware.reporting import report
from pytest_poolaware.reporting.runstats import ItemResult, RunSnapshot, RunStats
from pytest_poolaware.reporting.trace_events import (
    BUDGET_COUNTER,
    HELD_BACK_NAME,
    WAIT_CATEGORY,
    WAIT_NAME,
    held_back_parts,
    render,
)
from pytest_poolaware.server.share import HeldBack, ShareCoordinator, summary_line
from pytest_poolaware.shared.markers import Markers
from pytest_poolaware.shared.protocol import ItemMeasures
from pytest_poolaware.shared.settings import Settings


class Clocks:
    """The wall clock and the run's own, moved together by the test."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def held_back(*spans: tuple[float, float]) -> tuple[HeldBack, Clocks]:
    """A run held back by another run during ``spans`` (in order)."""
    clocks = Clocks()
    held = HeldBack(clocks, now=clocks)
    for start, end in spans:
        clocks.now = start
        held.note(True)
        clocks.now = end
        held.note(False)
    return held, clocks


def collect(snapshot: RunSnapshot, **extra: Any) -> RunStats:
    """The run's stats from a snapshot, as the plugin collects them at the session's end."""
    return report.collect(
        settings=Settings(budget=4, budget_source="--pool-budget"),
        snapshot=snapshot,
        started=9.0,
        finished=13.0,
        outcomes={},
        **extra,
    )


def test_a_test_s_waits_count_only_while_another_run_held_this_one_back() -> None:
    held, clocks = held_back((101.0, 103.0), (105.0, 106.0))
    assert held.seconds == 3.0
    # Two threads' waits at once count once; the part before 101 was the run's own.
    assert held.within([(100.0, 102.0), (101.5, 102.5), (104.0, 105.5)]) == (
        (101.0, 102.5),
        (105.0, 105.5),
    )
    assert held.within([(103.0, 105.0)]) == ()  # between the spans
    assert held.charge("t.py::test_a", [(100.0, 101.5)]) == ((101.0, 101.5),)
    assert held.charge("t.py::test_b", [(102.0, 105.5)]) == ((102.0, 103.0), (105.0, 105.5))
    assert held.charge("t.py::test_c", [(103.0, 104.0)]) == ()
    assert held.longest == ("t.py::test_b", 1.5)
    clocks.now = 107.0
    held.note(True)  # held back again, and still
    assert held.within([(106.5, 109.0)]) == ((107.0, 109.0),)


def sharing() -> ShareCoordinator:
    """What the summary line reads of a run's sharing."""
    patience = SimpleNamespace(times=0)
    seen = SimpleNamespace(
        peers_seen=1, namespace="default", lowest=3, gave_way=0, patience=patience
    )
    return cast(ShareCoordinator, seen)


def test_the_sharing_line_names_the_test_held_back_longest() -> None:
    line = summary_line(sharing(), 4.381, ("t.py::test_x", 2.104))
    assert line == (
        "shared the server's room with up to 1 other run(s) (name space 'default'): budget "
        "down to 3 at times, held back 4.38s waiting for another run (longest: t.py::test_x "
        "2.10s)"
    )
    assert summary_line(sharing(), 0.0) == (
        "shared the server's room with up to 1 other run(s) (name space 'default'): budget "
        "down to 3 at times, held back 0.00s waiting for another run"
    )


def measured(start: float, end: float, waits: tuple[tuple[float, float], ...]) -> ItemMeasures:
    return ItemMeasures(
        need=1, peak_open=1, duration=end - start, waited=sum(b - a for a, b in waits),
        start=start, end=end, rerun="", open=0, idle=0, version=1, waits=waits,
    )  # fmt: skip


def test_the_report_and_the_trace_carry_what_other_runs_cost() -> None:
    """One test waited 1.5 s, 1.0 s of it while another run held this one back; the other
    waited for the budget alone; the run was held back 1.25 s in all."""
    snapshot = RunSnapshot(
        workers=2,
        collection=("t.py::test_held", "t.py::test_alone", "t.py::test_never"),
        markers=(Markers(), Markers(), Markers()),
        lanes=(Lane.FANOUT, Lane.FANOUT, Lane.FANOUT),
        results=(
            ItemResult(
                "t.py::test_held",
                Lane.FANOUT,
                "gw0",
                measured(11.5, 12.0, ((10.0, 11.5),)),
                held_back=((10.25, 11.25),),
            ),
            ItemResult(
                "t.py::test_alone", Lane.FANOUT, "gw1", measured(11.0, 12.0, ((10.0, 11.0),))
            ),
        ),
    )
    stats = collect(snapshot, held_back_by_runs=1.25)
    data = stats.to_json()
    assert data["run"]["held_back_by_runs"] == 1.25
    assert [test["held_back_by_runs"] for test in data["tests"]] == [1.0, 0.0, None]
    doc = json.loads(render(stats))
    assert problems(doc) == []
    waits = [
        (event["args"]["nodeid"], event["name"], event["ts"], event["dur"])
        for event in doc["traceEvents"]
        if event.get("cat") == WAIT_CATEGORY
    ]
    assert sorted(waits) == [
        ("t.py::test_alone", WAIT_NAME, 1_000_000, 1_000_000),
        ("t.py::test_held", HELD_BACK_NAME, 1_250_000, 1_000_000),
        ("t.py::test_held", WAIT_NAME, 1_000_000, 250_000),
        ("t.py::test_held", WAIT_NAME, 2_250_000, 250_000),
    ]


def test_the_report_and_the_trace_show_the_budget_as_it_moved() -> None:
    """The budget was 4 when the run began, fell to 2 while another run took its share,
    and came back: the report lists each step, the trace's budget counter steps with it
    (and holds the last value to the session's end)."""
    snapshot = RunSnapshot(workers=2, budgets=((9.5, 4), (10.0, 2), (11.5, 4)))
    stats = collect(snapshot)
    assert stats.to_json()["budget_timeline"] == [[9.5, 4], [10.0, 2], [11.5, 4]]
    doc = json.loads(render(stats))
    assert problems(doc) == []
    steps = [
        (event["ts"], event["args"]["budget"])
        for event in doc["traceEvents"]
        if event.get("name") == BUDGET_COUNTER
    ]
    assert steps == [(0, 4), (1_000_000, 2), (2_500_000, 4), (4_000_000, 4)]


def test_a_run_that_met_no_other_run_reports_no_cost() -> None:
    stats = collect(RunSnapshot(workers=1))
    assert stats.to_json()["run"]["held_back_by_runs"] is None


def test_a_wait_is_cut_where_another_run_held_this_one_back() -> None:
    assert held_back_parts((0.0, 4.0), [(1.0, 2.0), (3.0, 5.0)]) == [
        (0.0, 1.0, False),
        (1.0, 2.0, True),
        (2.0, 3.0, False),
        (3.0, 4.0, True),
    ]
    assert held_back_parts((0.0, 1.0), [(2.0, 3.0)]) == [(0.0, 1.0, False)]
    assert held_back_parts((0.0, 1.0), [(0.0, 1.0)]) == [(0.0, 1.0, True)]
