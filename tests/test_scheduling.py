"""End to end: real xdist workers, a real PostgreSQL, what a user of ``--dist poolaware`` sees."""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any

import psycopg
import pytest
from inner import (
    ENGINE_CONFTEST,
    RECORDING_CONFTEST,
    connection_errors,
    entries,
    run,
    serve_limited_role,
)

#: How often the server-side sampler looks at pg_stat_activity.
SAMPLE_INTERVAL = 0.005
#: How long the backends of a run that just ended may take to exit.
LEFTOVER_TIMEOUT = 10.0

CONFTEST = ENGINE_CONFTEST + RECORDING_CONFTEST

SUITE = """
import pytest
from conftest import hold

@pytest.mark.serial_only
class TestProvisioning:
    @pytest.mark.parametrize("step", range(4))
    def test_provision(self, engine, step):
        hold(engine, 8, 0.3)

@pytest.mark.parallel_safe
@pytest.mark.parametrize("n", range(24))
def test_light(engine, n):
    hold(engine, 1, 0.05)

@pytest.mark.parametrize("n", range(3))
def test_unmarked_heavy(engine, n):
    hold(engine, 7, 0.3)

@pytest.mark.parametrize("n", range(8))
def test_unmarked_light(engine, n):
    hold(engine, 2, 0.05)
"""


class ServerSampler:
    """Samples the role's connections in pg_stat_activity from a superuser connection."""

    def __init__(self, dsn: str, role: str) -> None:
        self._dsn, self._role = dsn, role
        self._stop = threading.Event()
        self.peak = 0
        self.samples = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "select count(*) from pg_stat_activity where usename = %s", (self._role,)
                ).fetchone()
                assert row is not None
                self.peak = max(self.peak, int(row[0]))
                self.samples += 1
                self._stop.wait(SAMPLE_INTERVAL)

    def __enter__(self) -> ServerSampler:
        self._wait_for_leftovers()
        self._thread.start()
        return self

    def _wait_for_leftovers(self) -> None:
        """Start from a server with none of the role's backends: those of a run that just
        ended (``--dist load``'s workers, say) take a moment to exit, and would be
        counted in the next run's peak."""
        deadline = time.monotonic() + LEFTOVER_TIMEOUT
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "select count(*) from pg_stat_activity where usename = %s", (self._role,)
                ).fetchone()
                assert row is not None
                if row[0] == 0:
                    return
                if time.monotonic() > deadline:
                    pytest.fail(f"{row[0]} backend(s) of {self._role} outlived their run")
                self._stop.wait(SAMPLE_INTERVAL)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def suite(
    pytester: pytest.Pytester,
    limited_role: Any,
    role_limit: int,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:
    """The write-up's suite shape against a role with a connection limit."""
    role_dsn, role = serve_limited_role(limited_role, role_limit, monkeypatch)
    log = pytester.path / "events.jsonl"
    monkeypatch.setenv("POOLAWARE_TEST_LOG", str(log))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    return {"dsn": role_dsn, "log": log, "role": role}


def test_load_exhausts_connections_where_poolaware_does_not(
    pytester: pytest.Pytester, suite: dict[str, Any]
) -> None:
    load = run(pytester, "-n", "4", "--dist", "load")
    assert load.ret == pytest.ExitCode.TESTS_FAILED
    assert connection_errors(load) > 0

    poolaware = run(pytester, "-n", "4", "--dist", "poolaware", "--cache-clear")
    poolaware.assert_outcomes(passed=39)
    assert connection_errors(poolaware) == 0


@pytest.mark.parametrize("role_limit", [15])
def test_server_never_sees_more_connections_than_the_budget(
    pytester: pytest.Pytester, suite: dict[str, Any], postgres_dsn: str
) -> None:
    # The role's limit is the budget itself: one connection too many and the server
    # refuses it, which the run would report as a rerun (or a failure).
    with ServerSampler(postgres_dsn, suite["role"]) as sampler:
        result = run(pytester, "-n", "4", "--dist", "poolaware", "--cache-clear")
    result.assert_outcomes(passed=39)
    assert "the server refused a connection" not in result.stdout.str()
    assert connection_errors(result) == 0
    assert sampler.samples > 10
    assert 0 < sampler.peak <= 15


def test_serial_tests_run_one_at_a_time_in_order_on_one_worker(
    pytester: pytest.Pytester, suite: dict[str, Any]
) -> None:
    result = run(pytester, "-n", "4", "--dist", "poolaware")
    result.assert_outcomes(passed=39)
    logged = entries(suite["log"])
    # An item rerun after giving way to a deadlock is logged twice: both attempts count.
    serial = [e for e in logged if e["serial"]]
    attempts = sorted(serial, key=lambda e: e["start"])
    serial = [
        e
        for e, after in zip(attempts, [*attempts[1:], None], strict=True)
        if after is None or after["nodeid"] != e["nodeid"]
    ]
    assert [e["nodeid"].rsplit("[", 1)[1] for e in sorted(serial, key=lambda e: e["start"])] == [
        "0]",
        "1]",
        "2]",
        "3]",
    ]
    ordered = attempts
    for before, after in itertools.pairwise(ordered):
        assert before["end"] <= after["start"], (before, after)
    lane = {e["worker"] for e in serial}
    assert len(lane) == 1
    # Dedicated: while the serial lane had work, its worker ran nothing else.
    last_serial_end = ordered[-1]["end"]
    others_on_lane = [
        e
        for e in logged
        if not e["serial"] and e["worker"] in lane and e["start"] < last_serial_end
    ]
    assert others_on_lane == []
    # The rest fanned out over the other workers.
    assert len({e["worker"] for e in logged if not e["serial"]} - lane) >= 2


def test_second_run_uses_what_the_first_learned(
    pytester: pytest.Pytester, suite: dict[str, Any]
) -> None:
    cold = run(pytester, "-n", "4", "--dist", "poolaware", "--cache-clear")
    cold.assert_outcomes(passed=39)
    history = json.loads(
        (pytester.path / ".pytest_cache" / "d" / "poolaware" / "history.json").read_text()
    )
    heavy = history["tests"]["test_suite.py::test_unmarked_heavy[0]"]
    assert heavy[0] == 7  # peak connections checked out at once
    warm = run(pytester, "-n", "4", "--dist", "poolaware")
    warm.assert_outcomes(passed=39)
    assert connection_errors(warm) == 0
    assert "rerun alone" not in warm.stdout.str()


def test_one_worker_runs_everything(pytester: pytest.Pytester, suite: dict[str, Any]) -> None:
    result = run(pytester, "-n", "1", "--dist", "poolaware")
    result.assert_outcomes(passed=39)


#: gw2 is slow to boot: its collection ends only once the long serial test has run (or
#: after a minute), and it writes down which of the two happened.
SLOW_WORKER_CONFTEST = """
import os, pathlib, time
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session):
    flag = pathlib.Path(os.environ["SERIAL_RAN"])
    if os.environ.get("PYTEST_XDIST_WORKER") == "gw2" and os.environ.get("SLOW_BOOT"):
        deadline = time.monotonic() + 60
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        (flag.parent / "gw2-collected-after-the-serial-test").write_text(str(flag.exists()))
"""

LONG_SERIAL_TEST = """
import os, pathlib, time
import pytest

@pytest.mark.serial_only
def test_long_serial():
    time.sleep(1.1)  # the run's critical path: longer than EARLY_START_SECONDS
    pathlib.Path(os.environ["SERIAL_RAN"]).write_text("ran")

@pytest.mark.serial_only
def test_next_serial():
    pass

@pytest.mark.parametrize("i", range(6))
def test_fan(i):
    pass
"""


def test_a_long_serial_lane_does_not_wait_for_a_slow_worker_to_boot(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = pytester.path / "serial-ran"
    monkeypatch.setenv("SERIAL_RAN", str(flag))
    pytester.makeconftest(SLOW_WORKER_CONFTEST)
    pytester.makepyfile(test_lanes=LONG_SERIAL_TEST)
    args = ("-n", "3", "--dist", "poolaware")
    run(pytester, *args).assert_outcomes(passed=8)  # learns the serial test is long
    flag.unlink()
    monkeypatch.setenv("SLOW_BOOT", "1")
    run(pytester, *args).assert_outcomes(passed=8)
    assert (pytester.path / "gw2-collected-after-the-serial-test").read_text() == "True"
