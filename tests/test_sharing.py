"""Several runs against one server: what they learn, and how they share its room."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from inner import CONNECTION_ERRORS, RUN_TIMEOUT, execnet_socket_servers
from test_discovery import connections
from test_scheduling import CONFTEST, SUITE

from pytest_poolaware.server import sql
from pytest_poolaware.server.connection import QUERY_DEADLINE, open_connection, target_database
from pytest_poolaware.server.discovery import read_facts
from pytest_poolaware.server.room import SERVER, room_of
from pytest_poolaware.server.share import GROWTH_WAIT, ShareCoordinator, share_summary
from pytest_poolaware.server.share_plan import (
    OUTSIDE_WINDOW,
    STALLED_AFTER,
    TICKET_MODULUS,
    Others,
)
from pytest_poolaware.server.share_progress import HEAD_PATIENCE
from pytest_poolaware.shared.limits import Limits, RunUse
from pytest_poolaware.worker.agent import RERUN_SERVER

ROLE_LIMIT = 16
POOL_ENV = {"PG_POOL_SIZE": "5", "PG_MAX_OVERFLOW": "10"}
#: What each test of test_scheduling.SUITE holds at once, by name.
REAL_NEEDS = {
    "TestProvisioning::test_provision": 8,
    "test_light": 1,
    "test_unmarked_heavy": 7,
    "test_unmarked_light": 2,
}
SUITE_TESTS = 39
#: Seconds a closed connection's backend may take to leave the server on a busy machine.
BACKEND_EXIT_BOUND = 30.0


def real_need(nodeid: str) -> int:
    name = nodeid.split("::", 1)[1].split("[", 1)[0]
    return REAL_NEEDS[name]


class Run:
    """One inner pytest run in its own checkout of the suite, as a CI job would have."""

    def __init__(self, root: Path, *args: str) -> None:
        self.root = root
        self.log = root / "events.jsonl"
        command = [sys.executable, "-m", "pytest", "-p", "no:randomly", *args]
        self.process = subprocess.Popen(
            command,
            cwd=root,
            env={**os.environ, "POOLAWARE_TEST_LOG": str(self.log)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = ""

    def tests_done(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0

    def wait(self) -> int:
        try:
            self.output, _ = self.process.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.output, _ = self.process.communicate()
            pytest.fail(f"run in {self.root} did not end:\n{self.output}")
        return self.process.returncode

    def connection_errors(self) -> int:
        return sum(self.output.count(marker) for marker in CONNECTION_ERRORS)

    @property
    def history_path(self) -> Path:
        return self.root / ".pytest_cache" / "d" / "poolaware" / "history.json"

    def history(self, *, required: bool = True) -> dict[str, list[Any]]:
        """What the run learned; with ``required=False``, nothing when it saved nothing
        (a run that the other one left no room to start, say)."""
        path = self.history_path
        if not required and not path.exists():
            return {}
        tests: dict[str, list[Any]] = json.loads(path.read_text())["tests"]
        return tests


def children(pid: int) -> list[int]:
    """The direct children of a process (its xdist workers, for a controller)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.extend(int(child) for child in (task / "children").read_text().split())
    return found


def alive(pid: int) -> bool:
    """Whether a process still runs (an exited one nobody reaped yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def checkout(root: Path) -> Path:
    root.mkdir()
    (root / "conftest.py").write_text(CONFTEST)
    (root / "test_suite.py").write_text(SUITE)
    (root / "pytest.ini").write_text("[pytest]\n")
    return root


@pytest.fixture
def shared_role(limited_role: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    role_dsn: str = limited_role(ROLE_LIMIT)
    monkeypatch.setenv("POOLAWARE_DSN", role_dsn)
    for name, value in POOL_ENV.items():
        monkeypatch.setenv(name, value)
    return str(psycopg.conninfo.conninfo_to_dict(role_dsn)["user"])


@pytest.mark.e2e
def test_what_a_contended_pair_learned_is_not_believed_by_a_run_alone(
    shared_role: str, tmp_path: Path
) -> None:
    """Two runs at once that do not coordinate overshoot the role's limit; the server
    refuses connections. Run alone afterwards, no test is believed to need more than it
    really holds."""
    args = ("-n", "4", "--dist", "poolaware", "--poolaware-share", "off")
    pair = [Run(checkout(tmp_path / name), *args) for name in ("a", "b")]
    for run in pair:
        run.wait()
    first = pair[0]
    # They did meet: the server refused connections to one of them at least.
    assert any(RERUN_SERVER in run.output or run.connection_errors() for run in pair)
    learned = first.history(required=False)  # only shown when the run alone is wrong
    alone = Run(first.root, *args)
    assert alone.wait() == 0, alone.output
    assert alone.history_path.exists(), alone.output
    after = alone.history()
    for nodeid, entry in after.items():
        need = entry[0]
        assert need is not None, (nodeid, entry)
        assert need <= real_need(nodeid), (nodeid, entry, learned.get(nodeid))


# -- remote workers ---------------------------------------------------------------------------

SOCKET_WORKERS = 4


@pytest.fixture
def socket_servers(shared_role: str, tmp_path: Path) -> Iterator[list[str]]:
    """execnet socket servers on localhost, one per worker (each serves one gateway at
    a time), started with the suite's environment as a remote machine would have it."""
    with execnet_socket_servers(SOCKET_WORKERS) as addresses:
        yield addresses


@pytest.mark.e2e
def test_workers_behind_socket_gateways_keep_the_budget(
    shared_role: str, socket_servers: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = checkout(tmp_path / "remote")
    for name in POOL_ENV:
        monkeypatch.delenv(name)
    tx = [arg for address in socket_servers for arg in ("--tx", f"socket={address}//chdir={root}")]
    run = Run(root, "--dist", "poolaware", *tx, "--cache-clear")
    assert run.wait() == 0, run.output
    assert f"{SUITE_TESTS} passed" in run.output
    assert run.connection_errors() == 0, run.output
    assert RERUN_SERVER not in run.output
    source = f"role {shared_role} CONNECTION LIMIT {ROLE_LIMIT}, 1 kept for the monitor"
    assert f"budget: 15 connections ({source})" in run.output
    # Counts came from every worker: the workers' peak is measured, not zero.
    assert "peak open connections (workers): 0" not in run.output


DROPPING_SUITE = """
import pytest
from sqlalchemy import text
from conftest import hold

@pytest.mark.serial_only
def test_cut_the_plugin_connection(engine):
    with engine.connect() as conn:
        cut = conn.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'pytest-poolaware-monitor' AND usename = current_user"
        )).scalar()
    assert cut == 1

@pytest.mark.parametrize("n", range(12))
def test_after(engine, n):
    hold(engine, 2, 0.05)
"""


#: The controller's side of DROPPING_SUITE: once the cut test has reported, it waits
#: (bounded) until the sharing thread has rejoined and the sampler has met the cut, so
#: the run cannot end before either looks again. Whether they did is what the run's
#: notes say.
NOTICING_CONFTEST = """
import time

CUT_NOTICED_BOUND = 30.0


class WaitForTheCutToBeNoticed:
    def __init__(self, config):
        self.config = config

    def noticed(self):
        controller = self.config.pluginmanager.get_plugin("poolaware-controller")
        server = getattr(controller, "server", None)
        share = getattr(server, "share", None)
        monitor = getattr(server, "monitor", None)
        rejoined = share is not None and (share.problem or share.interruptions)
        return bool(rejoined and monitor is not None and monitor.problem)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.nodeid.endswith("test_cut_the_plugin_connection"):
            deadline = time.monotonic() + CUT_NOTICED_BOUND
            while not self.noticed() and time.monotonic() < deadline:
                time.sleep(0.01)


def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(WaitForTheCutToBeNoticed(config))
"""


@pytest.mark.e2e
def test_a_coordinating_connection_that_drops_mid_run_is_a_note(
    shared_role: str, tmp_path: Path
) -> None:
    root = checkout(tmp_path / "cut")
    (root / "conftest.py").write_text(CONFTEST + NOTICING_CONFTEST)
    (root / "test_suite.py").write_text(DROPPING_SUITE)
    run = Run(root, "-n", "2", "--dist", "poolaware", "--poolaware-share", "auto")
    assert run.wait() == 0, run.output
    assert "13 passed" in run.output
    assert "note: the coordinating connection dropped (" in run.output
    assert "the run rejoined the other runs after" in run.output
    assert "note: server monitoring stopped after " in run.output


#: Tests of a few connections each: two runs share the room at every moment, and none
#: needs more than a share (the waits of tests needing most of the room are not at
#: stake here, the loss of the coordinating connections is).
SHARED_SUITE = """
import pytest
from conftest import hold

@pytest.mark.parametrize("n", range(40))
def test_some(engine, n):
    hold(engine, 3, 0.15)
"""
SHARED_SUITE_TESTS = 40


@pytest.mark.e2e
def test_two_runs_whose_coordinating_connections_are_terminated_end_with_every_test(
    shared_role: str, tmp_path: Path
) -> None:
    """An administrator terminates both runs' coordinating connections mid-run: each
    holds itself to a safe budget until it has rejoined (their last budgets together
    could exceed the room), and both end with every test passed, none refused."""
    args = ("-n", "4", "--dist", "poolaware")
    pair = []
    for name in ("a", "b"):
        root = checkout(tmp_path / name)
        (root / "test_suite.py").write_text(SHARED_SUITE)
        pair.append(Run(root, *args))
    deadline = time.monotonic() + RUN_TIMEOUT
    while min(run.tests_done() for run in pair) < 3:
        assert all(run.process.poll() is None for run in pair), "a run ended early"
        assert time.monotonic() < deadline, "the runs never started their tests"
        time.sleep(0.05)
    coordinating = (
        "SELECT pid FROM pg_stat_activity "
        "WHERE application_name = 'pytest-poolaware-monitor' AND usename = %s"
    )
    with psycopg.connect(os.environ["POOLAWARE_DSN"], autocommit=True) as admin:
        pids = [row[0] for row in admin.execute(coordinating, (shared_role,))]
        assert len(pids) == 2
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    for run in pair:
        assert run.wait() == 0, run.output
        assert f"{SHARED_SUITE_TESTS} passed" in run.output
        assert run.connection_errors() == 0, run.output
        assert RERUN_SERVER not in run.output
        assert "the coordinating connection dropped (" in run.output or (
            "sharing the server's room stopped" in run.output
        ), run.output


# -- cross-run waits --------------------------------------------------------------------------


class FakeClock:
    """A clock the test moves: the growth wait ends when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0  # monotonic clocks do not start at 0

    def __call__(self) -> float:
        return self.now


class Coordinated:
    """One run's coordinator on its own connection, as the plugin makes it, stepped by
    hand (no background thread) against the real server."""

    def __init__(
        self, dsn: str, namespace: str, clock: FakeClock, stalled_after: float = math.inf
    ) -> None:
        """``stalled_after``: the no-progress time, never by default (the tests move the
        clock past the growth wait without the run being stalled)."""
        self.connection = open_connection(dsn)
        facts = read_facts(self.connection, target_database(dsn))
        alone = room_of(facts)
        self.share = ShareCoordinator(
            self.connection,
            namespace=namespace,
            facts=facts,
            room=alone,
            ceiling=alone.budget,
            clock=clock,
            reconnect=lambda: open_connection(dsn),
            stalled_after=stalled_after,
        )

    def wants(
        self,
        need: int,
        *,
        in_use: int = 0,
        open_: int = 0,
        stuck: bool = False,
        rerun: bool = False,
        item: int = 0,
    ) -> None:
        """The run's planner: it holds ``in_use`` and an item needing ``need`` waits
        (``stuck``: test ``item`` waits mid-test for one more connection; ``rerun``:
        that test is a rerun, which cannot give way)."""
        self.share.report(
            RunUse(
                in_use,
                open_,
                pending=True,
                wants=need,
                using=self.share.budget(),
                rerun_waits=rerun,
                stuck=item if stuck or rerun else None,
            )
        )


def settle(*runs: Coordinated, steps: int = 4) -> None:
    for _ in range(steps):
        for run in runs:
            assert run.share.step(), run.share.problem


@pytest.fixture
def two_runs(limited_role: Any) -> Iterator[tuple[Coordinated, Coordinated, FakeClock]]:
    dsn = limited_role(ROLE_LIMIT)
    clock = FakeClock()
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    runs = (Coordinated(dsn, namespace, clock), Coordinated(dsn, namespace, clock))
    try:
        yield runs[0], runs[1], clock
    finally:
        for run in runs:
            run.share.stop()
            run.connection.close()


def terminate(connection: Any) -> None:
    """End a connection's session from another one, as an administrator would."""
    with psycopg.connect(connection.info.dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (connection.info.backend_pid,))


def test_a_run_that_loses_touch_holds_itself_safe_then_rejoins(
    two_runs: tuple[Coordinated, Coordinated, FakeClock],
) -> None:
    """The coordinating connection of a run holding 10 of the room is terminated: its
    leases are gone, so it keeps no more than it held, falls to its even part of the
    room (6 of 16 between two runs, each with its own connection and a closing slot
    kept) as its tests end, waits for no growth, then rejoins on a new connection."""
    first, second, _ = two_runs
    first.wants(10)
    second.wants(2)
    settle(first, second)
    assert first.share.budget() == 10
    first.wants(10, in_use=10, open_=10)
    terminate(first.connection)
    assert not first.share.step()
    assert (first.share.budget(), first.share.limits().ceiling) == (10, 10)
    first.wants(10, in_use=4, open_=4)
    assert (first.share.budget(), first.share.limits().ceiling) == (6, 6)
    first.wants(10, in_use=9, open_=4)  # never up while out of touch
    assert first.share.budget() == 6
    assert first.share.rejoin()
    assert first.share.problem is None
    assert first.share.step(), first.share.problem
    (note,) = first.share.interruptions
    assert "the run rejoined the other runs after" in note
    assert "holding itself to the 10 connection(s) it held, falling to 6" in note


def test_a_run_that_rejoins_first_leaves_the_other_what_it_held(
    two_runs: tuple[Coordinated, Coordinated, FakeClock],
) -> None:
    """An administrator terminates both runs' coordinating connections. The first
    rejoins before the second, which still holds itself to what it held (up to 6 of its
    8) and may open it meanwhile: the first's new leases leave the second's last ones
    taken for the departed grace, as if it had watched them go, rather than take the
    whole room at once."""
    first, second, _ = two_runs
    for _ in range(6):  # each step, as the planners report after every decision
        first.wants(2)
        second.wants(8, in_use=6, open_=2)
        settle(first, second, steps=1)
    held = second.share.budget()
    assert held >= 6
    first.wants(14)  # and the first wants the whole room
    for run in (first, second):
        terminate(run.connection)
        assert not run.share.step()
    second.wants(8, in_use=6, open_=2)
    safe = second.share.budget()  # what the second may still open, out of touch
    assert 1 <= safe <= held
    assert first.share.rejoin()
    # Each run's own connection and the closing slot aside, the room is 13.
    assert first.share.budget() + safe <= ROLE_LIMIT - 3


def step_both(
    runs: tuple[Coordinated, Coordinated], *, steps: int = 4, **wants: dict[str, Any]
) -> None:
    """Step both runs, each reporting first what it wants, as the planners do after
    every decision (``wants``: ``first`` and ``second``, keyword arguments of
    ``Coordinated.wants`` with the need as ``need``)."""
    for _ in range(steps):
        for run, name in zip(runs, ("first", "second"), strict=True):
            if name in wants:
                run.wants(**wants[name])
            settle(run, steps=1)


def step_until(
    runs: tuple[Coordinated, Coordinated], done: Callable[[], bool], **wants: dict[str, Any]
) -> None:
    """``step_both`` one step at a time until ``done`` (a request served: the planner
    would start the item at once, which these runs do not), within 8 steps."""
    for _ in range(8):
        if done():
            return
        step_both(runs, steps=1, **wants)
    assert done()


def asked_first(run: Coordinated, stamp: int | None = None) -> None:
    """Return once the server's clock has moved past ``run``'s ticket (or ``stamp``): a
    request made from now on is younger (tickets made in the same millisecond go by
    run)."""
    stamp = run.share._leases.stamp if stamp is None else stamp
    assert stamp is not None
    deadline = time.monotonic() + 10.0
    while sql.server_ticks(run.connection, TICKET_MODULUS) == stamp:
        assert time.monotonic() < deadline, "the server's clock did not move"


def test_two_runs_waiting_for_the_whole_room_do_not_hold_each_other_back(
    two_runs: tuple[Coordinated, Coordinated, FakeClock],
) -> None:
    """Each run has an item needing 14 of the 16: all of the room once the other run is
    gone (each run's own connection and the closing slot aside), so neither can be
    served while the other is there. Served first, either would stop the other for
    nothing: they split the room as without tickets, neither gives way nor goes past
    the room, and the first left alone gets the whole room."""
    first, second, clock = two_runs
    step_both((first, second), first={"need": 1}, second={"need": 1})
    step_both((first, second), first={"need": 14}, second={"need": 14})
    assert first.share._leases.stamp is not None
    assert second.share._leases.stamp is not None
    assert sorted([first.share.budget(), second.share.budget()]) == [6, 7]
    for run in (first, second):
        assert not run.share.limits().give_way
        assert not run.share.limits().may_pass
    # The other run ends (its connection, and so its leases, go): the first gets the room.
    second.connection.close()
    # Its backend leaves the server a moment after the close: step until it has.
    deadline = time.monotonic() + BACKEND_EXIT_BOUND
    while first.share.budget() < 14 and time.monotonic() < deadline:
        first.wants(14)
        clock.now += 2 * OUTSIDE_WINDOW  # what it last saw open stops counting
        settle(first, steps=1)
    assert first.share.budget() == 14


def test_of_two_tests_waiting_mid_test_on_each_other_the_younger_gives_way(
    two_runs: tuple[Coordinated, Coordinated, FakeClock],
) -> None:
    """Two cold runs, 13 of the role's 16 between their tests: one holds 7 open for a test
    that wants an eighth, the other 6 for a test that wants a seventh; neither can have
    it while the other holds on. The test that asked later gives way, at once (no timer
    decides). When it is a rerun, it cannot give way (no third attempt): its ticket goes
    first, and the other run's test gives way instead."""
    first, second, _ = two_runs
    step_both((first, second), first={"need": 7, "in_use": 7}, second={"need": 6, "in_use": 6})
    assert (first.share.budget(), second.share.budget()) == (7, 6)
    step_both((first, second), steps=1, first={"need": 8, "in_use": 7, "stuck": True})
    asked_first(first)
    stuck = {"need": 7, "in_use": 6, "stuck": True}
    step_both((first, second), first={"need": 8, "in_use": 7, "stuck": True}, second=stuck)
    assert not first.share.limits().give_way
    assert second.share.limits().give_way
    assert second.share.gave_way == 1
    rerun = {"need": 7, "in_use": 6, "rerun": True}
    step_both((first, second), first={"need": 8, "in_use": 7, "stuck": True}, second=rerun)
    assert first.share.limits().give_way
    assert not second.share.limits().give_way
    # The first run's test gave way: its connections closed, the rerun gets its room.
    step_until((first, second), lambda: second.share.budget() >= 7, first={"need": 8}, second=rerun)


def test_a_test_growing_one_connection_at_a_time_keeps_its_ticket_s_age(
    limited_role: Any,
) -> None:
    """A cold test asks for each connection past its run's budget in turn: between two
    asks its ticket is served and given back, yet the next one keeps the first's stamp
    (with a younger one, it could give way to a test that began waiting after it).
    Another test's ask takes a stamp of its own."""
    run = Coordinated(limited_role(ROLE_LIMIT), f"test-{uuid.uuid4().hex[:8]}", FakeClock())
    try:
        settle(run)
        budget = run.share.budget()
        run.wants(budget + 1, in_use=budget, stuck=True, item=3)
        settle(run, steps=1)
        stamp = run.share._leases.stamp
        assert stamp is not None
        run.wants(1, in_use=budget - 2, stuck=True, item=3)  # served: its connect granted
        settle(run, steps=1)
        assert run.share._leases.stamp is None
        asked_first(run, stamp)
        run.wants(budget + 1, in_use=budget, stuck=True, item=3)
        settle(run, steps=1)
        assert run.share._leases.stamp == stamp
        run.wants(1, in_use=budget - 2, stuck=True, item=3)
        settle(run, steps=1)
        run.wants(budget + 1, in_use=budget, stuck=True, item=4)
        settle(run, steps=1)
        assert run.share._leases.stamp not in (None, stamp)
    finally:
        run.share.stop()
        run.connection.close()


def test_a_request_first_in_line_that_the_others_cannot_serve_stops_holding_them_back(
    two_runs: tuple[Coordinated, Coordinated, FakeClock],
) -> None:
    """The second run keeps 6 connections open between its tests (a Django connection
    per worker, say): leased, they never come back while it runs. The first asks for
    12 of the 13: first in line, it stops the second (a budget of 1), yet cannot get
    more than 7. Once its leases have not grown for HEAD_PATIENCE, it stops holding the
    second back, which gets its fair share again, and the summary says so."""
    first, second, clock = two_runs
    step_both((first, second), first={"need": 1}, second={"need": 6, "in_use": 6})
    step_both((first, second), steps=1, first={"need": 12})
    asked_first(first)
    kept = {"need": 7, "in_use": 6, "open_": 6}
    step_both((first, second), first={"need": 12}, second=kept)
    assert first.share.budget() == 7
    assert second.share.budget() == 1
    clock.now += HEAD_PATIENCE + 1
    step_both((first, second), first={"need": 12}, second=kept)
    assert second.share.budget() >= 6
    assert first.share.patience.times == 1
    line = share_summary(first.share)
    assert line is not None
    assert "1 time(s) a request first in line stopped holding the other runs back" in line


def test_a_younger_request_waits_for_the_older_one_then_is_served(
    two_runs: tuple[Coordinated, Coordinated, FakeClock],
) -> None:
    """One run asks for 13 (the whole room beside the other run), the other then for 8:
    the first is served first, the other once the first's tests are done with it."""
    first, second, _ = two_runs
    step_both((first, second), first={"need": 1}, second={"need": 1})
    step_both((first, second), steps=1, first={"need": 13})
    asked_first(first)
    wants = {"first": {"need": 13}, "second": {"need": 8}}
    step_until((first, second), lambda: first.share.budget() == 13, **wants)
    assert second.share.budget() == 0
    # Its item started: its tests use the room, its next item needs 1.
    step_both((first, second), first={"need": 1, "in_use": 13}, second={"need": 8})
    assert second.share.budget() == 0
    first.share.report(RunUse(0, 0, pending=False))  # they ended: nothing left to run
    step_until((first, second), lambda: second.share.budget() >= 8, second={"need": 8})


def silent_for_more_than(conn: Any, seconds: float) -> None:
    """Wait until the server has seen ``conn`` idle for more than ``seconds``."""
    with psycopg.connect(conn.info.dsn, autocommit=True) as watcher:
        deadline = time.monotonic() + 10 * seconds + QUERY_DEADLINE
        while True:
            (idle,) = watcher.execute(
                "SELECT extract(epoch FROM now() - state_change)::float8"
                " FROM pg_stat_activity WHERE pid = %s",
                (conn.info.backend_pid,),
            ).fetchone() or (0.0,)
            if idle > seconds:
                return
            assert time.monotonic() < deadline, f"still active after {seconds}s"
            time.sleep(seconds / 10)


def test_a_run_silent_past_the_no_progress_time_is_no_longer_honoured(
    limited_role: Any,
) -> None:
    """A run holds leases for 8 connections and stops moving (suspended: its session and
    locks live on). Once its coordinating connection has been silent past the no-progress
    time, the other run's share no longer leaves it that room: it takes slot numbers past
    the limit's for the stalled run's, says so once, and counts only what the stalled run
    has open. The stalled run, moving again, starts nothing new until its first step,
    gives back the leases its tests do not use, and says so."""
    dsn = limited_role(ROLE_LIMIT)
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    stalled_clock, clock = FakeClock(), FakeClock()
    stalled = Coordinated(dsn, namespace, stalled_clock, stalled_after=5.0)
    other = Coordinated(dsn, namespace, clock, stalled_after=0.2)
    try:
        stalled.wants(8, in_use=2)
        settle(stalled)
        held = stalled.share.budget()
        assert held >= 8
        silent_for_more_than(stalled.connection, 0.2)
        other.wants(12)
        settle(other)
        assert other.share.budget() >= 12  # 16 less each run's own connection, the
        # closing slot, and nothing the stalled run has open
        assert held + other.share.budget() > ROLE_LIMIT
        (note,) = other.share.interruptions
        assert "made no progress for 0.2s (suspended or wedged)" in note
        # The stalled run moves again, its clock 6 s on: nothing new before its step.
        stalled_clock.now += 6.0
        assert stalled.share.limits() == Limits(2, 2, give_way=False, may_pass=False)
        settle(stalled, steps=1)
        assert stalled.share.budget() < held
        (note,) = stalled.share.interruptions
        assert note.startswith("this run made no progress for 6.0s (suspended or wedged)")
    finally:
        for run in (stalled, other):
            run.share.stop()
            run.connection.close()


def test_a_run_stopped_in_the_middle_of_a_step_resumes_on_its_next_one(
    limited_role: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP lands anywhere, also while the run looks at the others (found as a flaky
    end-to-end test: the resumed run never said it had stopped). What that step saw is
    stale once it goes on, and the others stopped honouring its leases meanwhile: it
    follows none of it and starts nothing new; its next step gives back the leases its
    tests do not use (here, alone, it takes the room again) and says so."""
    clock = FakeClock()
    run = Coordinated(limited_role(ROLE_LIMIT), f"test-{uuid.uuid4().hex[:8]}", clock, 5.0)
    try:
        run.wants(8, in_use=2)
        settle(run)
        held = run.share.budget()
        assert held >= 8
        leases = run.share._leases
        look = leases.look

        def look_then_stop() -> tuple[Others, int]:
            seen = look()
            clock.now += 6.0  # stopped right after looking
            return seen

        monkeypatch.setattr(leases, "look", look_then_stop)
        assert run.share.step()
        assert run.share.limits() == Limits(2, 2, give_way=False, may_pass=False)
        assert run.share.interruptions == []
        monkeypatch.undo()
        settle(run, steps=1)
        (note,) = run.share.interruptions
        assert note.startswith("this run made no progress for 6.0s (suspended or wedged)")
    finally:
        run.share.stop()
        run.connection.close()


def test_another_login_s_room_caps_the_share(limited_role: Any) -> None:
    """The run alone gets the whole room of the shared limit, but never more than the
    cap another login of its tests set, however much it asks for."""
    run = Coordinated(limited_role(ROLE_LIMIT), f"test-{uuid.uuid4().hex[:8]}", FakeClock())
    try:
        run.wants(ROLE_LIMIT)
        settle(run)
        assert run.share.budget() == ROLE_LIMIT - 2  # its own connection, one closing
        woken: list[None] = []
        run.share._on_change = lambda: woken.append(None)
        run.share.cap(5)
        assert (run.share.budget(), run.share.limits().ceiling, len(woken)) == (5, 5, 1)
        run.wants(ROLE_LIMIT, in_use=5, open_=5)
        settle(run)
        assert (run.share.budget(), run.share.limits().ceiling) == (5, 5)
        run.share.cap(9)  # a cap only ever lowers
        assert run.share.budget() == 5
    finally:
        run.connection.close()


def test_a_run_alone_goes_past_its_budget_into_open_connections_only_after_the_wait(
    limited_role: Any,
) -> None:
    """Alone on the server, an item needing more than the run's budget goes past it at
    once, as without sharing, when no other client holds connections. While 8
    connections of no run are open (a run just killed, whose workers still close
    theirs), it waits for them to go, as long as the growth wait: they may be clients
    that never leave, counted from when they came: the item may have waited for its
    share to grow long before (the survivor of a killed run had: its rerun went past the
    budget into the killed run's connections at once, and the server refused it)."""
    dsn = limited_role(ROLE_LIMIT)
    clock = FakeClock()
    run = Coordinated(dsn, f"test-{uuid.uuid4().hex[:8]}", clock)
    try:
        settle(run, steps=1)
        run.wants(run.share.budget() + 1)
        settle(run, steps=1)
        assert run.share.limits().may_pass
        clock.now += GROWTH_WAIT + 1  # a wait before the connections came does not count
        with connections(dsn, 8):
            run.wants(12)
            settle(run)
            assert run.share.budget() < 12
            assert not run.share.limits().may_pass
            clock.now += GROWTH_WAIT + 1
            settle(run, steps=1)
            assert run.share.limits().may_pass
    finally:
        run.share.stop()
        run.connection.close()


def test_a_login_that_cannot_see_other_roles_still_counts_their_connections(
    limited_role: Any,
) -> None:
    """A plain role (no pg_read_all_stats) sees other roles' connections without their
    backend type; sharing the server's own limit, it still counts them as taken."""
    mine, other = limited_role(-1), limited_role(-1)  # max_connections binds
    clock = FakeClock()
    run = Coordinated(mine, f"test-{uuid.uuid4().hex[:8]}", clock)
    try:
        run.wants(run.share.ceiling)
        settle(run, steps=1)
        before = run.share.limits().ceiling
        with connections(other, 4):
            settle(run, steps=1)
            clock.now += 2 * OUTSIDE_WINDOW  # they stay: the room shared out counts them
            settle(run, steps=1)
            during = run.share.limits().ceiling
    finally:
        run.connection.close()
    assert run.share.room.scope == SERVER
    assert before - during >= 4


@pytest.mark.e2e
def test_one_of_two_runs_killed_mid_run_leaves_the_other_every_test(
    shared_role: str, tmp_path: Path
) -> None:
    """Two runs share the role's room (the default); one is killed with SIGKILL once it
    has started its tests. Its leases die with its connection, its workers' connections
    linger a moment: the other run finishes every test, none refused by the server."""
    args = ("-n", "4", "--dist", "poolaware")
    killed, survivor = (Run(checkout(tmp_path / name), *args) for name in ("killed", "survivor"))
    deadline = time.monotonic() + RUN_TIMEOUT
    while killed.tests_done() < 3 and killed.process.poll() is None:
        assert time.monotonic() < deadline, "the run to kill never started its tests"
        time.sleep(0.05)
    workers = children(killed.process.pid)
    killed_at = time.time()
    killed.process.send_signal(signal.SIGKILL)  # the controller only, as a runner might
    killed.wait()
    # Its workers start nothing more and go (their connections with them).
    deadline = time.monotonic() + RUN_TIMEOUT
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "the killed run's workers never ended"
        time.sleep(0.05)
    entries = [json.loads(line) for line in killed.log.read_text().splitlines()]
    started_after = [e["nodeid"] for e in entries if e["start"] > killed_at]
    assert len(started_after) <= len(workers), started_after  # one each was on its way
    assert survivor.wait() == 0, survivor.output
    assert f"{SUITE_TESTS} passed" in survivor.output
    assert survivor.connection_errors() == 0, survivor.output
    assert RERUN_SERVER not in survivor.output


#: A run to suspend: its first test is known (from a history file) to need 10
#: connections, holds one, says so and waits for the outer test; light tests queue behind.
STALLING_SUITE = """
import pathlib, time
import pytest
from conftest import hold
from sqlalchemy import text

def test_hold(engine):
    with engine.connect() as conn:
        conn.execute(text("select 1"))
        pathlib.Path({ready!r}).write_text("")
        deadline = time.monotonic() + 120
        while not pathlib.Path({go!r}).exists() and time.monotonic() < deadline:
            time.sleep(0.05)

@pytest.mark.parametrize("n", range(6))
def test_light(engine, n):
    hold(engine, 1, 0.05)
"""


@pytest.mark.e2e
def test_a_run_suspended_past_the_no_progress_time_does_not_hold_the_other_back(
    shared_role: str, tmp_path: Path
) -> None:
    """A run is suspended (SIGSTOP, as Ctrl-Z does) while its test holds leases for the
    10 connections it is known to need but has one open: its session and its locks live
    on. Another run arrives, whose serial tests need 8 of the 13 left beside it: after
    STALLED_AFTER it stops honouring the stopped run's leases and finishes every test
    while that one is still stopped, with no refusal, saying why. Resumed, the stopped
    run ends too, and says what happened."""
    root = checkout(tmp_path / "stopped")
    ready, go = root / "ready", root / "go"
    (root / "test_suite.py").write_text(STALLING_SUITE.format(ready=str(ready), go=str(go)))
    history = {"schema": 1, "tests": {"test_suite.py::test_hold": [10, 1.0]}}
    (root / "history.json").write_text(json.dumps(history))
    args = ("-n", "4", "--dist", "poolaware")
    stopped = Run(root, *args, "--poolaware-history=history.json")
    deadline = time.monotonic() + RUN_TIMEOUT
    while not ready.exists():
        assert stopped.process.poll() is None, stopped.wait()
        assert time.monotonic() < deadline, "the run to stop never started its test"
        time.sleep(0.05)
    group = [stopped.process.pid, *children(stopped.process.pid)]
    for pid in group:
        os.kill(pid, signal.SIGSTOP)
    other = Run(checkout(tmp_path / "other"), *args, "--poolaware-report=report.json")
    try:
        assert other.wait() == 0, other.output
    finally:
        go.write_text("")
        for pid in group:
            os.kill(pid, signal.SIGCONT)
    assert f"{SUITE_TESTS} passed" in other.output
    assert other.connection_errors() == 0, other.output
    assert RERUN_SERVER not in other.output, other.output
    assert f"made no progress for {STALLED_AFTER:g}s (suspended or wedged)" in other.output
    # Held back until the stopped run's leases stopped counting, not while it slept.
    report = json.loads((other.root / "report.json").read_text())
    assert report["run"]["held_back_by_runs"] < STALLED_AFTER + GROWTH_WAIT, other.output
    # The report shows the budget rising once the stopped run's leases stopped counting.
    budgets = [budget for _, budget in report["budget_timeline"]]
    assert budgets[-1] > min(budgets), report["budget_timeline"]
    assert stopped.wait() == 0, stopped.output
    assert "7 passed" in stopped.output
    assert "this run made no progress for" in stopped.output


ORPHAN_SUITE = """
import os, signal, time
import psycopg

def test_outlives_its_controller():
    os.kill(os.getppid(), signal.SIGKILL)  # this worker's controller: the run is killed
    outcomes = []
    for attempt in range(3):
        try:
            psycopg.connect(os.environ["POOLAWARE_DSN"]).close()
            outcomes.append("connected")
        except Exception as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
    with open(os.environ["ORPHAN_OUTCOME"], "w") as out:
        out.write("\\n".join(outcomes))
"""


def test_a_worker_whose_run_was_killed_opens_no_connection(
    shared_role: str, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's controller dies while a test runs: nothing holds that worker within a
    budget any more, and another run may already be taking the room the dead one
    leased. Its connect is refused (not let through ungated), whatever the gate hears."""
    outcome = pytester.path / "outcome.txt"
    monkeypatch.setenv("ORPHAN_OUTCOME", str(outcome))
    pytester.makepyfile(test_orphan=ORPHAN_SUITE)
    result = pytester.runpytest_subprocess("-n", "1", "--dist", "poolaware", "-p", "no:randomly")
    assert result.ret == -signal.SIGKILL
    deadline = time.monotonic() + RUN_TIMEOUT
    while not outcome.exists() or len(outcome.read_text().splitlines()) < 3:
        assert time.monotonic() < deadline, "the orphaned worker never tried to connect"
        time.sleep(0.05)
    outcomes = outcome.read_text().splitlines()
    assert len(outcomes) == 3
    for line in outcomes:
        assert line.startswith("ControllerGone: pytest-poolaware: the run's controller has gone")


# -- a lost network ---------------------------------------------------------------------------


class StallingProxy:
    """A TCP proxy on localhost in front of the server that, once ``stall`` is set, keeps
    every connection open but delivers nothing more either way: a network that went
    away without closing anything (the proxy's side still acknowledges, so TCP
    keepalives see nothing wrong)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stall = threading.Event()
        self.accepted = 0
        self._sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            self.accepted += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self.stall.is_set():
                    sink.sendall(data)

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


STALLED_SUITE = """
import pytest
from conftest import hold

@pytest.mark.parametrize("n", range(16))
def test_small(engine, n):
    hold(engine, 2, 0.3)
"""


@pytest.mark.e2e
def test_a_coordinating_connection_whose_network_stalls_is_given_up_with_a_note(
    shared_role: str, tmp_path: Path
) -> None:
    """The plugin's own connection goes through a proxy that stops delivering mid-run:
    its queries would wait for ever. The run finishes every test, within the query
    deadline's reach, and says why sharing and monitoring stopped."""
    root = checkout(tmp_path / "stalled")
    (root / "test_suite.py").write_text(STALLED_SUITE)
    params = psycopg.conninfo.conninfo_to_dict(os.environ["POOLAWARE_DSN"])
    proxy = StallingProxy(str(params["host"]), int(str(params["port"])))
    through_proxy = psycopg.conninfo.make_conninfo(
        os.environ["POOLAWARE_DSN"], host="127.0.0.1", port=proxy.port
    )
    try:
        run = Run(root, "-n", "2", "--dist", "poolaware", "--poolaware-monitor", through_proxy)
        deadline = time.monotonic() + RUN_TIMEOUT
        while run.tests_done() < 2 and run.process.poll() is None:
            assert time.monotonic() < deadline, "the run never started its tests"
            time.sleep(0.05)
        proxy.stall.set()
        assert run.wait() == 0, run.output
    finally:
        proxy.close()
    # The plugin's own connection, and its tries to rejoin: the tests' never went through.
    assert proxy.accepted >= 1
    assert "16 passed" in run.output
    assert run.connection_errors() == 0, run.output
    assert (
        f"note: sharing the server's room stopped: no answer from the server within "
        f"{QUERY_DEADLINE:g}s (the network may be down)"
    ) in run.output
    assert "note: server monitoring stopped after " in run.output
