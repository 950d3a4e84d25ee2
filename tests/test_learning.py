"""No DSN given: the server is learned from the first connection a worker opens."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from inner import (
    ENGINE_CONFTEST,
    RECORDING_CONFTEST,
    ROLE_LIMIT,
    connection_errors,
    free_port,
    run,
)
from inner import ROLE_PASSWORD as PASSWORD
from test_scheduling import SUITE

from pytest_poolaware.server.discovery import Discovery
from pytest_poolaware.server.learning import (
    LEARNING_ATTEMPTS,
    REMEMBERED,
    ServerLearning,
    dsn_of,
    same_server,
)
from pytest_poolaware.server.room import ServerFacts
from pytest_poolaware.shared.protocol import RoomKnown, RoomRequest, ServerSeen, decode
from pytest_poolaware.worker.agent import RERUN_SERVER
from pytest_poolaware.worker.login import login_of

#: Tests in test_scheduling.SUITE.
SUITE_TESTS = 39
#: A hold on connects longer than any test's wait: they wait until the login is read.
READ_HOLD_FOREVER = 3600.0
#: The inner suite's own DSN variable: the plugin is not told about it.
APP_CONFTEST = (ENGINE_CONFTEST + RECORDING_CONFTEST).replace("POOLAWARE_DSN", "APP_DSN")


# -- the worker side: what a driver's connection says ----------------------------------------


def test_psycopg_says_where_its_connection_went(secret_role: tuple[str, str]) -> None:
    dsn, role = secret_role
    with psycopg.connect(dsn) as conn:
        login = login_of(conn, "psycopg")
        params = conn.info.get_parameters()
    assert login is not None
    assert (login.user, login.dbname, login.password) == (role, params["dbname"], PASSWORD)
    assert PASSWORD not in repr(login)
    # The plugin's own connection can be opened from it.
    with psycopg.connect(dsn_of(login)) as own:
        assert own.info.user == role


def test_psycopg2_says_where_its_connection_went(secret_role: tuple[str, str]) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    dsn, role = secret_role
    conn = psycopg2.connect(dsn)
    try:
        login = login_of(conn, "psycopg2")
    finally:
        conn.close()
    assert login is not None
    assert (login.user, login.password, login.driver) == (role, PASSWORD, "psycopg2")
    with psycopg.connect(dsn_of(login)) as own:
        assert own.info.user == role


def test_asyncpg_says_where_its_connection_went(secret_role: tuple[str, str]) -> None:
    asyncpg = pytest.importorskip("asyncpg")
    dsn, role = secret_role
    expected = psycopg.conninfo.conninfo_to_dict(dsn)

    async def learn() -> ServerSeen | None:
        conn = await asyncpg.connect(dsn)
        try:
            return login_of(conn, "asyncpg")
        finally:
            await conn.close()

    login = asyncio.run(learn())
    assert login is not None
    assert (login.user, login.password, login.dbname) == (role, PASSWORD, expected["dbname"])
    assert login.port == int(expected.get("port") or 5432)
    with psycopg.connect(dsn_of(login)) as own:
        assert own.info.user == role


def test_an_unknown_driver_or_connection_says_nothing() -> None:
    assert login_of(object(), "psycopg") is None
    assert login_of(object(), "other") is None


def test_the_message_travels_without_showing_its_password() -> None:
    seen = ServerSeen("db.example", 5433, "app", "acc_app", PASSWORD, "psycopg")
    assert decode(seen.to_wire()) == seen
    assert PASSWORD not in repr(seen)
    assert seen.where() == "acc_app@db.example:5433/app"
    known = RoomKnown(14, 16, "role acc_app CONNECTION LIMIT 16")
    assert decode(known.to_wire()) == known
    assert known.room == (16, "role acc_app CONNECTION LIMIT 16")
    assert RoomKnown(30).room is None


# -- the controller side ---------------------------------------------------------------------


def learn_from(login: ServerSeen, *, local: bool = True) -> tuple[int | None, Discovery, Any]:
    """Run ``ServerLearning`` on ``login`` with one request held meanwhile: (the budget it
    returned, what it found, what came back to the inbox)."""
    inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    woken = threading.Event()
    adopted: list[Discovery] = []

    def on_learned(found: Discovery, dsn: str, seen: ServerSeen | None) -> int:
        adopted.append(found)
        return 30

    learning = ServerLearning((30, "--pool-budget"), inbox, woken.set, on_learned)
    assert learning.take() is None
    learning.seen(login, local)
    request = RoomRequest(1)
    assert learning.hold("gw1", request)  # the server is being read
    assert woken.wait(60)
    budget = learning.take()
    assert not learning.hold("gw1", request)
    assert learning.take() is None  # adopted once
    return budget, adopted[0], inbox.get_nowait()


def test_one_connection_passes_at_a_time_until_the_server_is_learned() -> None:
    inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    wakes: list[None] = []
    learning: ServerLearning[str] = ServerLearning(
        None, inbox, lambda: wakes.append(None), lambda found, dsn, seen: 30
    )
    first, second, third = RoomRequest(1, item=0), RoomRequest(1, item=5), RoomRequest(2, item=6)
    assert not learning.hold("gw0", first)  # the one connection
    assert learning.hold("gw1", second)
    assert learning.hold("gw1", third)
    # Its test ended and taught nothing (the connection failed): the next one may try.
    learning.item_done("gw1", 5)  # not the one that passed: nothing changes
    assert inbox.empty()
    learning.item_done("gw0", 0)
    assert (inbox.get_nowait(), len(wakes)) == (("gw1", second), 1)
    assert not learning.hold("gw1", second)
    passing = ("gw1", 5)
    for _ in range(2, LEARNING_ATTEMPTS):
        learning.item_done(*passing)
        node, request = inbox.get_nowait()
        assert not learning.hold(node, request)
        passing = (node, request.item)
    assert learning.pending
    learning.item_done(*passing)
    # Tests keep connecting without teaching anything: stop trying, keep the budget.
    assert learning.take() == 30
    assert not learning.pending
    assert not learning.hold("gw1", third)


def test_a_connection_outside_tests_that_taught_nothing_lets_the_next_pass() -> None:
    """The connection that passed was opened at session start (no item): it is over once
    its worker ends any item, or goes away; the next held request may then pass."""
    inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    learning: ServerLearning[str] = ServerLearning(
        None, inbox, lambda: None, lambda found, dsn, seen: 30
    )
    outside, second, third = RoomRequest(1), RoomRequest(1), RoomRequest(1)
    assert not learning.hold("gw0", outside)
    assert learning.hold("gw1", second)
    assert learning.hold("gw2", third)
    learning.item_done("gw1", 3)  # another worker's item: nothing changes
    assert inbox.empty()
    learning.item_done("gw0", 7)  # gw0 ran a test since: its connect is long over
    assert inbox.get_nowait() == ("gw1", second)
    assert not learning.hold("gw1", second)
    learning.worker_gone("gw2")  # its held request goes with it
    learning.worker_gone("gw1")  # the one passing: nothing is left to pass
    assert inbox.empty()


def test_the_worker_whose_connection_passed_is_never_held_behind_it() -> None:
    """The connection that passed taught nothing (it failed, say, and the test connects
    again): its worker's next connects cannot wait for its item to end, which they
    block; they pass, and the pass stays with that worker's latest item. The other
    workers still wait, one connection at a time."""
    inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    learning: ServerLearning[str] = ServerLearning(
        None, inbox, lambda: None, lambda found, dsn, seen: 30
    )
    assert not learning.hold("gw0", RoomRequest(1, item=4))
    assert learning.hold("gw1", RoomRequest(1, item=9))
    assert not learning.hold("gw0", RoomRequest(2, item=4))  # the same test, again
    assert not learning.hold("gw0", RoomRequest(3, item=5))  # its next test
    learning.item_done("gw0", 4)  # over already: the pass is with item 5 now
    assert inbox.empty()
    learning.item_done("gw0", 5)
    node, request = inbox.get_nowait()
    assert (node, request) == ("gw1", RoomRequest(1, item=9))
    assert not learning.hold(node, request)  # the next worker's turn
    assert learning.hold("gw0", RoomRequest(4, item=6))


def test_a_server_that_cannot_be_read_keeps_the_configured_budget() -> None:
    login = ServerSeen("127.0.0.1", free_port(), "app", "acc_app", PASSWORD, "psycopg", 4242)
    budget, found, released = learn_from(login)
    assert budget == 30
    assert released == ("gw1", RoomRequest(1))  # the held request goes back to the scheduler
    assert (found.choice, found.connection) == (None, None)
    assert "cannot use" in found.notes[0]
    assert PASSWORD not in found.notes[0]


def test_a_remote_worker_connecting_to_its_own_machine_is_not_believed() -> None:
    login = ServerSeen("localhost", 5432, "app", "acc_app", PASSWORD, "psycopg", 4242)
    budget, found, _ = learn_from(login, local=False)
    assert budget == 30
    assert found.connection is None
    assert "a worker on another machine connected to localhost" in found.notes[0]


def test_another_login_on_the_server_is_read_while_connections_wait() -> None:
    """A later login on the same server is read (on the plugin's connection, here a stand
    -in) while every new connect request waits; its reading sets the budget; a login
    on another server, or one that cannot be read, is only a note."""
    inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    woken = threading.Event()
    reads: list[tuple[str, list[int]]] = []
    adopted: list[tuple[str, object, list[int]]] = []
    go = threading.Event()

    def read_login(login: ServerSeen, runs: Any) -> ServerFacts:
        reads.append((login.user, list(runs)))
        assert go.wait(60)
        if login.user == "nobody":
            raise LookupError("role nobody does not exist\nmore")
        return facts_of(login.user)

    def on_login(login: ServerSeen, read: object, runs: Any) -> int | None:
        adopted.append((login.user, read, list(runs)))
        return 5 if isinstance(read, ServerFacts) else None

    learning: ServerLearning[str] = ServerLearning(
        None,
        inbox,
        woken.set,
        lambda found, dsn, seen: 30,
        read_login=read_login,
        on_login=on_login,
        read_hold=READ_HOLD_FOREVER,
    )
    admin = ServerSeen("127.0.0.1", free_port(), "app", "admin", None, "psycopg", 11)
    learning.seen(admin)
    assert woken.wait(60)  # nothing listens there: read (and failed) at once
    woken.clear()
    assert learning.take() == 30
    app = ServerSeen(admin.host, admin.port, "app", "acc_app", PASSWORD, "psycopg", 12)
    learning.seen(app)
    learning.seen(ServerSeen("db.example", admin.port, "app", "acc_app", None, "psycopg", 13))
    learning.seen(ServerSeen(admin.host, admin.port, "app", "nobody", None, "psycopg", 14))
    learning.seen(dataclasses.replace(app, pid=15))  # another worker's: a pid of the run's
    request = RoomRequest(1)
    assert learning.hold("gw1", request)  # acc_app is being read
    assert learning.take() is None
    go.set()
    assert woken.wait(60)
    woken.clear()
    assert learning.take() == 5
    assert adopted[0][0] == "acc_app"
    assert adopted[0][2] == [11, 12, 13, 14, 15]  # the pids known once it was read
    assert inbox.get_nowait() == ("gw1", request)
    # Then the next login: its failure is handed over in one line.
    assert learning.hold("gw1", request)
    assert woken.wait(60)
    assert learning.take() is None
    assert adopted[1][:2] == ("nobody", "role nobody does not exist")
    assert not learning.hold("gw1", request)
    assert [user for user, _ in reads] == ["acc_app", "nobody"]
    notes = learning.notes()
    assert len(notes) == 2
    assert "tests also connected as acc_app@db.example:" in notes[1]
    assert "on another server" in notes[1]


def test_connects_wait_for_another_login_s_reading_only_so_long() -> None:
    """A reading that takes longer than its hold (the plugin's connection busy) goes on
    without holding connects: the held ones go back to the scheduler, the next ones
    pass, and the login's room still lowers the budget once read."""
    inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    woken = threading.Event()
    go = threading.Event()
    now = [0.0]

    def read_login(login: ServerSeen, runs: Any) -> ServerFacts:
        assert go.wait(60)
        return facts_of(login.user)

    learning: ServerLearning[str] = ServerLearning(
        None,
        inbox,
        woken.set,
        lambda found, dsn, seen: 30,
        read_login=read_login,
        on_login=lambda login, read, runs: 5,
        read_hold=0.05,
        clock=lambda: now[0],
    )
    admin = ServerSeen("127.0.0.1", free_port(), "app", "admin", None, "psycopg", 11)
    learning.seen(admin)
    assert woken.wait(60)  # nothing listens there: read (and failed) at once
    woken.clear()
    assert learning.take() == 30
    learning.seen(ServerSeen(admin.host, admin.port, "app", "acc_app", None, "psycopg", 12))
    held = RoomRequest(1)
    assert learning.hold("gw1", held)
    assert learning.take() is None
    assert inbox.empty()
    now[0] += 0.05
    assert woken.wait(60)  # the hold's end wakes the scheduler
    woken.clear()
    assert learning.take() is None
    assert inbox.get_nowait() == ("gw1", held)
    assert not learning.hold("gw2", RoomRequest(1))
    go.set()
    assert woken.wait(60)
    assert learning.take() == 5  # read at last: it still sets the budget


def facts_of(role: str) -> ServerFacts:
    return ServerFacts(
        version=160000,
        max_connections=100,
        superuser_reserved=3,
        reserved=0,
        role=role,
        superuser=False,
        uses_reserved=False,
        role_limit=8,
        database="app",
        database_limit=-1,
        others_server=0,
        others_role=0,
        others_database=0,
    )


def test_other_databases_of_a_login_read_are_one_login_and_wait_for_nothing() -> None:
    """pytest-django makes one database per worker, all as the same role: each is read
    (a database may have a limit of its own) without holding connects, and said in one
    line unless one has its own limit, which then lowers the budget as any login's."""
    inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    woken = threading.Event()
    adopted: list[str] = []
    limited = {"test_app_gw3"}

    def read_login(login: ServerSeen, runs: Any) -> ServerFacts:
        facts = facts_of(login.user)
        limit = 2 if login.dbname in limited else -1
        return dataclasses.replace(facts, database=login.dbname, database_limit=limit)

    def on_login(login: ServerSeen, read: object, runs: Any) -> int | None:
        adopted.append(login.dbname)
        return 2

    learning: ServerLearning[str] = ServerLearning(
        None,
        inbox,
        woken.set,
        lambda found, dsn, seen: 30,
        read_login=read_login,
        on_login=on_login,
    )
    first = ServerSeen("127.0.0.1", free_port(), "app", "acc_app", None, "psycopg", 11)
    learning.seen(first)
    assert woken.wait(60)
    woken.clear()
    assert learning.take() == 30
    budgets = []
    for worker in range(4):
        learning.seen(dataclasses.replace(first, dbname=f"test_app_gw{worker}", pid=20 + worker))
        assert not learning.hold(f"gw{worker}", RoomRequest(1))  # nothing waits for it
        assert woken.wait(60)
        woken.clear()
        budgets.append(learning.take())
    assert budgets == [None, None, None, 2]  # only the database with a limit of its own
    assert adopted == ["test_app_gw3"]
    notes = learning.notes()
    assert len(notes) == 2, notes
    assert "tests also used 3 other databases as acc_app@127.0.0.1:" in notes[1]
    assert "(test_app_gw0, test_app_gw1, test_app_gw2)" in notes[1]


def test_logins_name_the_same_server_by_host_and_port() -> None:
    one = ServerSeen("127.0.0.1", 5432, "app", "admin")
    assert same_server(one, ServerSeen("127.0.0.1", 5432, "other", "acc_app"))
    assert not same_server(one, ServerSeen("127.0.0.1", 5433, "app", "admin"))
    assert not same_server(one, ServerSeen("db.example", 5432, "app", "admin"))


# -- end to end -------------------------------------------------------------------------------


@pytest.fixture
def app_suite(
    pytester: pytest.Pytester, secret_role: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> str:
    """The write-up's suite shape, connecting through its own variable; no POOLAWARE_DSN,
    no PG_POOL_*: the plugin knows nothing of the server."""
    dsn, role = secret_role
    monkeypatch.setenv("APP_DSN", dsn)
    monkeypatch.setenv("POOLAWARE_TEST_LOG", str(pytester.path / "events.jsonl"))
    for name in ("POOLAWARE_DSN", "PG_POOL_SIZE", "PG_MAX_OVERFLOW", "PG_POOL_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest(APP_CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    return role


def source_of(role: str) -> str:
    """The budget's source when the role's limit binds."""
    return f"role {role} CONNECTION LIMIT {ROLE_LIMIT}, 1 kept for the monitor"


def assert_learned_and_kept(result: pytest.RunResult, role: str) -> str:
    """Every test passed within the role's limit, learned from the workers' connections,
    and the password shown nowhere; returns the run's output."""
    result.assert_outcomes(passed=SUITE_TESTS)
    text = result.stdout.str() + result.stderr.str()
    assert connection_errors(result) == 0, text
    assert RERUN_SERVER not in text
    result.stdout.fnmatch_lines(
        [
            f"budget: 15 connections ({source_of(role)})",
            "peak open connections (workers): *",
            f"note: the server and login were learned from the first connection a worker "
            f"opened: {role}@*",
        ]
    )
    # Counts came from every worker: the workers' peak is measured, not zero.
    assert "peak open connections (workers): 0" not in text
    assert REMEMBERED not in text
    assert PASSWORD not in text
    return text


def written(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_the_role_limit_is_learned_from_the_first_connection_cold_and_warm(
    pytester: pytest.Pytester, app_suite: str
) -> None:
    role = app_suite
    files = ["--poolaware-report", "report.json", "--poolaware-trace", "trace.json"]
    for first in (True, False):
        args = ["-n", "4", "--dist", "poolaware", *files, "-rA"]
        result = run(pytester, *args, *(["--cache-clear"] if first else []))
        text = assert_learned_and_kept(result, role)
        assert "WARNING" not in text
        report = json.loads((pytester.path / "report.json").read_text())
        assert (report["run"]["budget"], report["run"]["budget_source"]) == (15, source_of(role))
        assert not any(test["rerun"] == RERUN_SERVER for test in report["tests"])
        # Nothing the run wrote holds the password either.
        assert PASSWORD not in written(pytester.path / "report.json")
        assert PASSWORD not in written(pytester.path / "trace.json")


def test_a_configured_budget_below_the_learned_room_is_kept(
    pytester: pytest.Pytester, app_suite: str
) -> None:
    result = run(pytester, "-n", "2", "--dist", "poolaware", "--pool-budget", "6")
    result.assert_outcomes(passed=SUITE_TESTS)
    assert connection_errors(result) == 0
    result.stdout.fnmatch_lines(["budget: 6 connections (--pool-budget)"])


def test_with_monitoring_turned_off_nothing_is_learned(
    pytester: pytest.Pytester, app_suite: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PG_POOL_SIZE", "5")
    monkeypatch.setenv("PG_MAX_OVERFLOW", "10")
    result = run(pytester, "-n", "2", "--dist", "poolaware", "--poolaware-monitor", "off")
    result.assert_outcomes(passed=SUITE_TESTS)
    result.stdout.fnmatch_lines(["budget: 15 connections (PG_POOL_SIZE + PG_MAX_OVERFLOW = *)"])
    assert "were learned from" not in result.stdout.str()


def test_the_next_run_starts_within_what_the_last_one_learned(
    pytester: pytest.Pytester, app_suite: str
) -> None:
    """Until it learns the server again, a run admits tests within the last run's budget
    (its connections still wait for the room, one at a time)."""
    pytester.makepyfile(test_free="def test_free():\n    pass\n")
    first = run(pytester, "-n", "2", "--dist", "poolaware", "--cache-clear")
    first.assert_outcomes(passed=SUITE_TESTS + 1)
    # This one opens no connection: the budget stays the remembered one.
    free = run(pytester, "-n", "2", "--dist", "poolaware", "test_free.py")
    free.assert_outcomes(passed=1)
    free.stdout.fnmatch_lines([f"budget: 15 connections ({source_of(app_suite)}, {REMEMBERED})"])
    assert "were learned from" not in free.stdout.str()
    assert (
        PASSWORD
        not in (pytester.path / ".pytest_cache")
        .joinpath("v", "poolaware", "learned_budget")
        .read_text()
    )


#: The limit of the application role in the two-login suite: above what the workers'
#: first connections as that role can hold before its room is read (one each), below
#: what four tests holding ``HELD`` connections each would take.
APP_LIMIT = 8
HELD = 3
#: A suite whose workers first connect as one login (once per worker: setting the
#: schema up), then hold ``HELD`` connections as the application role in each test, and
#: open one more as ``LATER_DSN`` first, when set.
TWO_LOGINS_CONFTEST = """
import os
import psycopg
import pytest

@pytest.fixture(scope="session", autouse=True)
def schema():
    with psycopg.connect(os.environ["FIRST_DSN"], autocommit=True) as conn:
        conn.execute("select 1")
"""
TWO_LOGINS_SUITE = f"""
import os
import psycopg
import pytest

@pytest.mark.parametrize("n", range(24))
def test_app(n):
    if os.environ.get("LATER_DSN"):
        with psycopg.connect(os.environ["LATER_DSN"], autocommit=True) as conn:
            conn.execute("select 1")
    conns = [psycopg.connect(os.environ["APP_DSN"], autocommit=True) for _ in range({HELD})]
    try:
        for conn in conns:
            conn.execute("select 1")
        conns[0].execute("select pg_sleep(0.2)")
    finally:
        for conn in conns:
            conn.close()
"""


def run_two_logins(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, first: str, app: str, later: str
) -> pytest.RunResult:
    """The two-login suite, four workers, no DSN and no budget given: every test passes
    and the server refused no connection."""
    monkeypatch.setenv("FIRST_DSN", first)
    monkeypatch.setenv("APP_DSN", app)
    monkeypatch.setenv("LATER_DSN", later)
    for name in ("POOLAWARE_DSN", "PG_POOL_SIZE", "PG_MAX_OVERFLOW", "PG_POOL_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest(TWO_LOGINS_CONFTEST)
    pytester.makepyfile(test_app=TWO_LOGINS_SUITE)
    result = run(pytester, "-n", "4", "--dist", "poolaware", "--poolaware-report", "report.json")
    text = result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=24)
    assert connection_errors(result) == 0, text
    assert RERUN_SERVER not in text
    return result


def test_the_tightest_login_sets_the_budget(
    pytester: pytest.Pytester,
    postgres_dsn: str,
    limited_role: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first connection is the unlimited login's; the budget computed for it alone
    lets four workers overshoot the application role's limit (the server refuses). Read
    on the plugin's connection, that role's room binds, whichever login connects."""
    app_dsn = limited_role(APP_LIMIT)
    role = str(psycopg.conninfo.conninfo_to_dict(app_dsn)["user"])
    result = run_two_logins(pytester, monkeypatch, postgres_dsn, app_dsn, "")
    limit = f"role {role} CONNECTION LIMIT {APP_LIMIT}"
    result.stdout.fnmatch_lines(
        [
            f"budget: * connections ({limit}*; {role}@*:*/* binds, the tightest of 2 logins)",
            f"peak open connections (server): * (application_name poolaware-* and role {role}, *",
            "note: the server and login were learned from the first connection a worker "
            "opened: postgres@*",
            f"note: tests also connected as {role}@*: room * ({limit}*)",
        ]
    )
    report = json.loads((pytester.path / "report.json").read_text())
    assert report["run"]["budget"] <= APP_LIMIT  # the plugin's own connection is another role's
    assert report["run"]["budget_source"].startswith(limit)
    assert not any(test["rerun"] == RERUN_SERVER for test in report["tests"])


def test_a_looser_login_learned_later_leaves_the_budget(
    pytester: pytest.Pytester,
    postgres_dsn: str,
    limited_role: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first login is the limited one; the superuser each test also connects as is
    read too, and only noted: its room is larger."""
    app_dsn = limited_role(APP_LIMIT)
    role = str(psycopg.conninfo.conninfo_to_dict(app_dsn)["user"])
    result = run_two_logins(pytester, monkeypatch, app_dsn, app_dsn, postgres_dsn)
    source = f"role {role} CONNECTION LIMIT {APP_LIMIT}, 1 kept for the monitor"
    result.stdout.fnmatch_lines(
        [
            f"budget: {APP_LIMIT - 1} connections ({source})",
            f"note: the server and login were learned from the first connection a worker "
            f"opened: {role}@*",
            "note: tests also connected as postgres@*: room * (max_connections *)",
        ]
    )
    assert "binds" not in result.stdout.str()
