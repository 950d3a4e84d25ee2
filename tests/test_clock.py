"""The plugin's clocks: no test that moves time (time-machine, freezegun,
``mock.patch``) moves the plugin's stamps or stretches its bounded waits."""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import freezegun
import pytest
import time_machine
from inner import ROLE_LIMIT, connection_errors, run

from pytest_poolaware.shared import clock

#: A real second, for bounds on waits the clocks must keep.
BOUND = 5.0
#: How far past the session's end a stamp may lie (the server's last samples are taken
#: as the session closes); a moved clock is off by years.
SLACK = 1.0


def _travellers() -> Iterator[tuple[str, Any]]:
    yield "time-machine forwards", time_machine.travel(datetime.datetime(2040, 1, 1), tick=False)
    yield "time-machine backwards", time_machine.travel(datetime.datetime(1990, 1, 1))
    yield "freezegun frozen", freezegun.freeze_time("2041-06-01")
    yield "freezegun backwards", freezegun.freeze_time("1991-06-01", tick=True)
    yield "mock.patch", mock.patch("time.time", return_value=0.0)


@pytest.mark.parametrize(("name", "traveller"), list(_travellers()))
def test_the_plugins_clocks_do_not_move_with_the_tests(name: str, traveller: Any) -> None:
    wall_before, counter_before = clock.wall(), clock.monotonic()
    with traveller:
        assert abs(time.time() - wall_before) > 1 or name == "mock.patch"
        wall_inside, counter_inside = clock.wall(), clock.monotonic()
    assert 0 <= wall_inside - wall_before < BOUND, name
    assert 0 <= counter_inside - counter_before < BOUND, name


def test_the_anchor_is_the_read_least_disturbed() -> None:
    """A pause between reading the counter and the wall clock (the process descheduled)
    would shift every stamp by it: of the reads, the tightest one anchors the clock."""
    readings = iter([0.0, 0.3, 1.0, 1.000002, 2.0, 2.1, 3.0, 3.5, 4.0, 4.2])
    wall_now, counter_now = clock._anchor(lambda: next(readings))
    assert counter_now == pytest.approx(1.000001)
    assert abs(wall_now - time.time()) < BOUND


def test_a_bounded_wait_ends_with_the_event_loops_clock_frozen() -> None:
    """``asyncio.wait_for`` would wait for ever here: the loop's clock is frozen."""
    outcome: list[object] = []

    async def wait_for_nothing() -> None:
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        outcome.append(await clock.bounded(never, 0.05))

    def frozen_run() -> None:
        with freezegun.freeze_time("2041-06-01"):
            asyncio.run(wait_for_nothing())

    thread = threading.Thread(target=frozen_run, daemon=True)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), "the bounded wait never ended"
    assert outcome == [None]


def test_a_bounded_wait_returns_what_came_in_time() -> None:
    async def quick() -> int:
        return 7

    assert asyncio.run(clock.bounded(quick(), BOUND)) == 7


#: An inner suite whose tests move the clock per test, per class and from a module
#: fixture, with each library, while their connects wait at the gate (two connections
#: each, one expected, a budget of 2 shared by two workers).
TRAVELLING = """
import datetime, os, time, unittest
from unittest import mock

import freezegun
import psycopg
import pytest
import time_machine

DSN = os.environ["SUITE_DSN"]


def two_connections():
    with psycopg.connect(DSN) as one, psycopg.connect(DSN) as two:
        one.execute("select 1")
        two.execute("select pg_sleep(0.05)")


@time_machine.travel(datetime.datetime(2040, 1, 1), tick=False)
def test_time_machine_frozen_in_the_future():
    two_connections()


@time_machine.travel(datetime.datetime(1990, 1, 1))
class TestTimeMachineInThePast(unittest.TestCase):  # as Django's test cases carry it
    def test_one(self):
        two_connections()

    def test_two(self):
        two_connections()


class TestTimeMachineForTheClass:
    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def travelled(cls):
        with time_machine.travel(datetime.datetime(2043, 1, 1), tick=False):
            yield

    def test_one(self):
        two_connections()


@freezegun.freeze_time("2041-06-01")
def test_freezegun_frozen():
    two_connections()


@freezegun.freeze_time("1991-06-01", tick=True)
class TestFreezegunInThePast:
    def test_one(self):
        two_connections()

    def test_two(self):
        two_connections()


def test_time_patched():
    with mock.patch("time.time", return_value=0.0), mock.patch(
        "time.monotonic", return_value=0.0
    ), mock.patch("time.perf_counter", return_value=0.0):
        two_connections()
"""

MODULE_FIXTURE = """
import datetime, os

import freezegun
import psycopg
import pytest
import time_machine

DSN = os.environ["SUITE_DSN"]


@pytest.fixture(scope="module", autouse=True)
def travelled():
    with {traveller}:
        yield


@pytest.mark.parametrize("i", range(3))
def test_in_the_moved_time(i):
    with psycopg.connect(DSN) as one, psycopg.connect(DSN) as two:
        one.execute("select 1")
        two.execute("select pg_sleep(0.05)")
"""


def _learned_durations(cache: Path) -> list[float]:
    """The durations the run's history learned (``history.json``: need and duration per
    node id)."""
    document = json.loads((cache / "d" / "poolaware" / "history.json").read_text())
    return [float(entry[1]) for entry in document["tests"].values()]


def _check_report(report: dict[str, Any], trace: dict[str, Any]) -> None:
    run_ = report["run"]
    started, finished, session = run_["started"], run_["finished"], run_["session"]
    assert run_["wall"] is not None
    assert 0 <= run_["wall"] <= session + SLACK
    tests = report["tests"]
    assert tests
    for test in tests:
        assert started - SLACK <= test["start"] <= test["end"] <= finished + SLACK, test
        assert 0 <= test["duration"] <= session, test
        assert 0 <= test["waited"] <= session, test
    for when, _worker, _count in report["timeline"]:
        assert started - SLACK <= when <= finished + SLACK
    assert not [n for n in run_["notes"] if "stamped outside the session" in n]
    limit_us = (session + SLACK) * 1e6
    for event in trace["traceEvents"]:
        if "ts" in event:
            assert -SLACK * 1e6 <= event["ts"] <= limit_us, event
        if "dur" in event:
            assert 0 <= event["dur"] <= limit_us, event


def test_suites_that_move_the_clock_leave_the_report_and_what_is_learned_true(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    limited_role: Callable[[int], str],
) -> None:
    dsn = limited_role(ROLE_LIMIT)
    monkeypatch.setenv("SUITE_DSN", dsn)
    monkeypatch.setenv("POOLAWARE_DSN", dsn)
    pytester.makepyfile(
        test_travelling=TRAVELLING,
        test_module_time_machine=MODULE_FIXTURE.format(
            traveller="time_machine.travel(datetime.datetime(2042, 1, 1), tick=False)"
        ),
        test_module_freezegun=MODULE_FIXTURE.format(
            traveller='freezegun.freeze_time("1992-01-01")'
        ),
    )
    for attempt in ("cold", "warm"):
        report_path = pytester.path / f"report-{attempt}.json"
        trace_path = pytester.path / f"trace-{attempt}.json"
        result = run(
            pytester,
            "-n",
            "2",
            "--dist",
            "poolaware",
            "--pool-budget",
            "2",
            f"--poolaware-report={report_path}",
            f"--poolaware-trace={trace_path}",
        )
        assert result.ret == 0, result.stdout.str()
        result.assert_outcomes(passed=14)
        assert connection_errors(result) == 0
        _check_report(json.loads(report_path.read_text()), json.loads(trace_path.read_text()))
        session = json.loads(report_path.read_text())["run"]["session"]
        durations = _learned_durations(pytester.path / ".pytest_cache")
        assert len(durations) == 14, attempt
        assert all(0 <= d <= session for d in durations), (attempt, durations)
