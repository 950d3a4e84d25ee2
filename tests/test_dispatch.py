"""What the controller gathers as the run goes (``dispatch.RunRecord``): pure parts."""

from __future__ import annotations

from pytest_poolaware.dispatch import OutsideTests, RunRecord
from pytest_poolaware.planning.core import Lane, Planner
from pytest_poolaware.reporting.runstats import ItemResult
from pytest_poolaware.shared.markers import UNMARKED
from pytest_poolaware.shared.protocol import ItemMeasures


def result(start: float, end: float, waits: tuple[tuple[float, float], ...] = ()) -> ItemResult:
    measures = ItemMeasures(
        need=1,
        peak_open=1,
        duration=end - start,
        waited=0.0,
        start=start,
        end=end,
        rerun="",
        open=0,
        idle=0,
        version=1,
        waits=waits,
    )
    return ItemResult("test_a.py::test_x", Lane.FANOUT, "gw0", measures)


def test_stamps_outside_the_session_are_clamped_and_counted() -> None:
    record = RunRecord(
        results=[result(105.0, 106.0), result(2.2e9, 2.2e9 + 1, waits=((50.0, 2.2e9),))]
    )
    assert record.keep_within(100.0, 200.0) == 1
    inside, moved = (r.measures for r in record.results)
    assert (inside.start, inside.end) == (105.0, 106.0)
    assert (moved.start, moved.end, moved.waits) == (200.0, 200.0, ((100.0, 200.0),))
    assert record.notes == [
        "1 tests were stamped outside the session, by up to 2.2e+09s (something moved the "
        "plugin's clock); their times are shown clamped to it"
    ]


def test_stamps_just_outside_the_session_are_the_clocks_own_error() -> None:
    """Each process anchors its clock on its own: the last test's end, stamped by a
    worker a few milliseconds before the controller closes the session, may read a few
    milliseconds after it. Clamped, and not taken for a moved clock."""
    record = RunRecord(results=[result(99.996, 100.5), result(150.0, 200.004)])
    assert record.keep_within(100.0, 200.0) == 0
    first, last = (r.measures for r in record.results)
    assert (first.start, last.end) == (100.0, 200.0)
    assert record.notes == []


def test_the_snapshot_before_the_collection_is_loaded() -> None:
    """Markers nobody reported are unmarked, every test is in the fan-out until the
    planner is loaded, and the notes end with the connections opened outside tests."""
    record = RunRecord(notes=["forgot the learned data of 2 tests that no longer exist"])
    record.outside.note("session start", 0.0)
    planner: Planner[str] = Planner(3)
    snapshot = record.snapshot(planner, workers=2, collection=("a.py::t", "a.py::u"), markers=())
    assert (snapshot.workers, snapshot.markers) == (2, (UNMARKED, UNMARKED))
    assert snapshot.lanes == (Lane.FANOUT, Lane.FANOUT)
    assert snapshot.notes == (
        "forgot the learned data of 2 tests that no longer exist",
        "1 connections opened outside tests (1 at session start), counted in the budget",
    )


def test_connections_outside_tests_are_summed_by_where() -> None:
    outside = OutsideTests()
    assert outside.summary() is None
    for phase in ("session start", "session start", "session finish"):
        outside.note(phase, 0.01)
    assert outside.summary() == (
        "3 connections opened outside tests (2 at session start, 1 at session finish), "
        "counted in the budget"
    )
    outside.note("collection", 2.5)
    assert "the longest waited 2.5s for room" in (outside.summary() or "")
