"""pg8000 (``pg8000.dbapi``, ``pg8000.native``, and the legacy ``pg8000`` SQLAlchemy
uses) against a real server: counted by backend pid, gated, closes seen once the backend
exits, the login learned; and a raw-pg8000 suite end to end, ``load`` against poolaware.

Its close rounds against a role limited to one connection are in ``test_drivers.py``
with every other driver's.
"""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Iterator
from typing import Any

import pg8000.dbapi
import pg8000.native
import psycopg
import pytest
from inner import ROLE_LIMIT, connection_errors, run
from inner import ROLE_PASSWORD as PASSWORD
from sqlalchemy import create_engine, make_url, text
from test_drivers import Seen, metering, pg8000_params, server_pids
from test_scheduling import ServerSampler

from pytest_poolaware.server.connection import APPLICATION_NAME as MONITOR
from pytest_poolaware.server.learning import dsn_of
from pytest_poolaware.worker.agent import RERUN_SERVER
from pytest_poolaware.worker.login import login_of
from pytest_poolaware.worker.meter import PoolMeter


@pytest.fixture
def metered() -> Iterator[tuple[PoolMeter, Seen]]:
    with metering() as both:
        yield both


def backend_pid(conn: Any) -> int:
    """The server's own word for the connection's backend pid."""
    if isinstance(conn, pg8000.native.Connection):
        return int(conn.run("select pg_backend_pid()")[0][0])
    cursor = conn.cursor()
    cursor.execute("select pg_backend_pid()")
    return int(cursor.fetchone()[0])


@pytest.mark.parametrize("connect", [pg8000.dbapi.connect, pg8000.native.Connection])
def test_a_connection_is_counted_by_backend_pid_and_gated_once(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str, connect: Any
) -> None:
    meter, seen = metered
    meter.begin(0)
    conn = connect(**pg8000_params(postgres_dsn))
    assert meter.pids() == [backend_pid(conn)]
    assert (meter.open, meter.checked_out, seen.gates) == (1, 1, [False])
    conn.close()
    assert meter.open == 0
    window = meter.end()
    assert (window.need, window.drivers) == (1, ("pg8000",))


def test_a_close_returns_once_the_server_let_the_backend_go(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, _ = metered
    with pg8000.native.Connection(**pg8000_params(postgres_dsn)) as conn:
        pid = backend_pid(conn)
    assert meter.open == 0  # no sweep: the close hook reported it
    assert pid not in server_pids(postgres_dsn)


def test_a_connect_waits_at_the_gate_before_it_reaches_the_server(
    postgres_dsn: str, limited_role: Any
) -> None:
    dsn = limited_role(2)
    role = psycopg.conninfo.conninfo_to_dict(dsn)["user"]
    waiting, go = threading.Event(), threading.Event()

    def gate(background: bool) -> None:
        if threading.current_thread() is connecting:  # not the admin's psycopg connect
            waiting.set()
            assert go.wait(30)

    errors: list[BaseException] = []
    meter = PoolMeter(on_change=lambda *counts: None, gate=gate, on_error=errors.append)
    meter.install()
    opened: list[Any] = []
    connecting = threading.Thread(
        target=lambda: opened.append(pg8000.dbapi.connect(**pg8000_params(dsn)))
    )
    try:
        connecting.start()
        assert waiting.wait(30)
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            row = admin.execute(
                "select count(*) from pg_stat_activity where usename = %s", (role,)
            ).fetchone()
        assert (row, meter.open) == ((0,), 0)  # held at the gate: nothing on the server
        go.set()
        connecting.join(30)
        assert meter.pids() == [backend_pid(opened[0])]
    finally:
        go.set()
        connecting.join(30)
        for conn in opened:
            conn.close()
        meter.uninstall()
    assert errors == []


def test_sqlalchemy_s_pg8000_connections_are_counted_once(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, seen = metered
    engine = create_engine(make_url(postgres_dsn).set(drivername="postgresql+pg8000"))
    meter.begin(0)
    with engine.connect() as a, engine.connect() as b:
        a.execute(text("select 1"))
        b.execute(text("select 1"))
        assert (meter.open, meter.checked_out) == (2, 2)
    assert (meter.end().need, meter.checked_out, meter.open) == (2, 0, 2)
    assert meter.end().drivers == ("pg8000",)  # the driver's count, not SQLAlchemy's own
    meter.release_idle()
    assert meter.open == 0
    engine.dispose()
    assert seen.gates == [False, False]  # once per connection, at the driver


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_connection_dropped_unclosed_is_uncounted_once_its_backend_exits(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, _ = metered
    conns: list[Any] = [pg8000.native.Connection(**pg8000_params(postgres_dsn))]
    pid = backend_pid(conns[0])
    conns.append(conns)  # a cycle: only the collector frees it, without a Terminate
    del conns
    gc.collect()
    meter.sweep()
    assert meter.open == 0
    assert pid not in server_pids(postgres_dsn)


@pytest.mark.usefixtures("metered")  # the database asked for is kept by the hook
def test_pg8000_says_where_its_connection_went(secret_role: tuple[str, str]) -> None:
    dsn, role = secret_role
    expected = psycopg.conninfo.conninfo_to_dict(dsn)
    with pg8000.native.Connection(**pg8000_params(dsn)) as conn:
        login = login_of(conn, "pg8000")
        pid = backend_pid(conn)
    assert login is not None
    assert (login.user, login.password, login.dbname) == (role, PASSWORD, expected["dbname"])
    assert (login.port, login.driver, login.pid) == (int(str(expected["port"])), "pg8000", pid)
    assert PASSWORD not in repr(login)
    with psycopg.connect(dsn_of(login)) as own:  # the plugin's own connection opens
        assert own.info.user == role


@pytest.mark.usefixtures("metered")
def test_without_a_database_the_login_names_the_user_s(postgres_dsn: str) -> None:
    params = pg8000_params(postgres_dsn)
    params.pop("database", None)
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        row = admin.execute("show unix_socket_directories").fetchone()
    assert row is not None
    directory = str(row[0]).split(",")[0].strip()
    socket_file = f"{directory}/.s.PGSQL.{params['port']}"
    with pg8000.dbapi.connect(user=params["user"], unix_sock=socket_file) as conn:
        login = login_of(conn, "pg8000")
    assert login is not None
    assert (login.host, login.port) == (directory, params["port"])
    assert login.dbname == login.user == params["user"]


# -- end to end ------------------------------------------------------------------------------

#: The inner suite: light tests on a module-scoped connection, tests whose thread opens
#: five connections, ``serial_only`` tests holding six, one unmarked test holding ten;
#: pg8000 alone (no SQLAlchemy, no psycopg in the tests).
PG8000_CONFTEST = """
import os, threading
from urllib.parse import unquote, urlsplit
import pg8000.dbapi, pg8000.native
import pytest

_URL = urlsplit(os.environ["POOLAWARE_DSN"])
PARAMS = {
    "user": unquote(_URL.username),
    "password": unquote(_URL.password) if _URL.password else None,
    "host": _URL.hostname,
    "port": _URL.port or 5432,
    "database": _URL.path.lstrip("/") or None,
}
HOLD = 0.3

def hold(n, seconds=HOLD):
    conns = []
    try:
        for _ in range(n):
            conns.append(pg8000.native.Connection(**PARAMS))
        conns[0].run(f"select pg_sleep({seconds})")
    finally:
        for conn in conns:
            conn.close()

def hold_in_a_thread(n):
    failed = []
    def opens():
        try:
            hold(n)
        except BaseException as exc:
            failed.append(exc)
    thread = threading.Thread(target=opens)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]

@pytest.fixture(scope="module")
def conn():
    conn = pg8000.dbapi.connect(**PARAMS)
    yield conn
    conn.close()
"""
PG8000_HEAVY = """
import pytest
from conftest import hold, hold_in_a_thread

def test_ten():
    hold(10)

@pytest.mark.parametrize("n", range(6))
def test_thread_opens_five(n):
    hold_in_a_thread(5)

@pytest.mark.serial_only
@pytest.mark.parametrize("n", range(2))
def test_serial_six(n):
    hold(6)
"""
PG8000_LIGHT = """
import pytest

@pytest.mark.parametrize("n", range(12))
def test_light(conn, n):
    cursor = conn.cursor()
    cursor.execute("select %s::int", (n,))
    assert cursor.fetchone() == [n]
"""
PG8000_TESTS = 1 + 6 + 2 + 12


class RunSampler(ServerSampler):
    """The role's backends on the server, the plugin's own connection left out."""

    def _run(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "select count(*) from pg_stat_activity "
                    "where usename = %s and application_name <> %s",
                    (self._role, MONITOR),
                ).fetchone()
                assert row is not None
                self.peak = max(self.peak, int(row[0]))
                self.samples += 1
                self._stop.wait(0.005)


@pytest.fixture
def pg8000_suite(
    pytester: pytest.Pytester, limited_role: Any, monkeypatch: pytest.MonkeyPatch
) -> str:
    """The suite against a role limited to 16 (the budget 15: one slot is the plugin's),
    nothing else configured; yields the role's name."""
    dsn = limited_role(ROLE_LIMIT)
    monkeypatch.setenv("POOLAWARE_DSN", dsn)
    for name in ("PG_POOL_SIZE", "PG_MAX_OVERFLOW", "PG_POOL_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeini("[pytest]\n")
    pytester.makeconftest(PG8000_CONFTEST)
    pytester.makepyfile(test_heavy=PG8000_HEAVY, test_light=PG8000_LIGHT)
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["user"])


def test_a_raw_pg8000_suite_stays_within_the_role_limit_where_load_is_refused(
    pytester: pytest.Pytester, pg8000_suite: str, postgres_dsn: str
) -> None:
    load = run(pytester, "-n", "4", "--dist", "load")
    assert load.ret == pytest.ExitCode.TESTS_FAILED
    assert connection_errors(load) > 0

    report = pytester.path / "report.json"
    for warm in (False, True):
        with RunSampler(postgres_dsn, pg8000_suite) as sampler:
            result = run(
                pytester,
                *("-n", "4", "--dist", "poolaware", f"--poolaware-report={report}"),
                *(() if warm else ("--cache-clear",)),
            )
        result.assert_outcomes(passed=PG8000_TESTS)
        assert connection_errors(result) == 0
        assert RERUN_SERVER not in result.stdout.str()
        result.stdout.fnmatch_lines(["budget: 15 connections (role * CONNECTION LIMIT 16, *)"])
        data = json.loads(report.read_text())
        assert not any(test["rerun"] == RERUN_SERVER for test in data["tests"])
        assert 0 < sampler.peak <= 15
        assert 0 < data["run"]["peak_open_server"] <= 15
        # The workers counted what the server saw: none of its connections went uncounted.
        assert 0 < data["run"]["peak_open_workers"] <= 15
        assert data["run"]["uncounted"] == {"most": 0, "end_server": 0, "end_workers": 0}
        needs = {t["nodeid"].split("[")[0]: t["need"] for t in data["tests"]}
        assert needs["test_heavy.py::test_ten"] == 10
        assert needs["test_heavy.py::test_serial_six"] == 6
        assert {tuple(t["drivers"]) for t in data["tests"]} == {("pg8000",)}
