"""Driver-level counting against a real server: every route, each connection counted once.

Run against the installed driver versions; ``compat.DRIVERS_TESTED`` lists the versions
these tests were run against (the matrix's ends), ``drivers.HOOKED_INTERNALS`` what they
rely on. pg8000's own tests are in ``test_pg8000.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
from collections.abc import Iterator
from typing import Any

import asyncpg
import pg8000.dbapi
import pg8000.native
import psycopg
import psycopg2
import pytest
from psycopg import connect as connect_imported_early  # bound before the hooks exist
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from pytest_poolaware.planning.core import Answer
from pytest_poolaware.server.monitor import ServerMonitor
from pytest_poolaware.shared.compat import DRIVERS_TESTED
from pytest_poolaware.shared.link import WorkerLink
from pytest_poolaware.shared.protocol import ReleaseIdle, RequestAnswer, RoomRequest, decode
from pytest_poolaware.worker.drivers import HOOKED_INTERNALS
from pytest_poolaware.worker.meter import PoolMeter


class Seen:
    """What a meter asked and reported."""

    def __init__(self) -> None:
        self.gates: list[bool] = []
        self.async_gates: list[bool] = []
        self.errors: list[BaseException] = []


@contextlib.contextmanager
def metering() -> Iterator[tuple[PoolMeter, Seen]]:
    """A meter with its hooks in, recording what it asked; no error may reach it."""
    seen = Seen()

    async def gate_async(background: bool) -> None:
        seen.async_gates.append(background)

    meter = PoolMeter(
        on_change=lambda *counts: None,
        gate=seen.gates.append,
        gate_async=gate_async,
        on_error=seen.errors.append,
    )
    meter.install()
    try:
        yield meter, seen
    finally:
        meter.uninstall()
    assert seen.errors == []


@pytest.fixture
def metered() -> Iterator[tuple[PoolMeter, Seen]]:
    with metering() as both:
        yield both


def server_pids(dsn: str) -> set[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "select pid from pg_stat_activity where backend_type = 'client backend'"
        ).fetchall()
    return {pid for (pid,) in rows}


def test_every_hooked_internal_names_the_versions_checked() -> None:
    assert {h.package for h in HOOKED_INTERNALS} == set(DRIVERS_TESTED)
    assert all(h.name and h.why for h in HOOKED_INTERNALS)


def test_psycopg_open_close_by_backend_pid(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, seen = metered
    meter.begin(0)
    conn = connect_imported_early(postgres_dsn)
    assert meter.pids() == [conn.info.backend_pid]
    assert (meter.open, meter.checked_out, seen.gates) == (1, 1, [False])
    conn.close()
    assert (meter.open, meter.end().need) == (0, 1)
    assert meter.end().drivers == ("psycopg",)


def test_psycopg_async_waits_by_awaiting(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, seen = metered

    async def use() -> None:
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
            assert meter.pids() == [conn.info.backend_pid]
        assert meter.open == 0

    asyncio.run(use())
    assert (seen.async_gates, seen.gates) == ([False], [])


def test_server_side_termination_reconciled(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, _ = metered
    conn = psycopg.connect(postgres_dsn, autocommit=True)
    pid = conn.info.backend_pid
    with psycopg.connect(postgres_dsn, autocommit=True) as killer:
        killer.execute("select pg_terminate_backend(%s)", [pid])
        meter.sweep()
        assert pid in meter.pids()  # the driver has not noticed: the server is asked
        for _ in range(200):
            if pid not in server_pids(postgres_dsn):
                break
    assert meter.reconcile(server_pids(postgres_dsn)) == 1
    assert meter.open == 0
    conn.close()
    assert meter.open == 0


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_garbage_collected_connection_uncounted(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, _ = metered
    conns: list[Any] = [
        psycopg.connect(postgres_dsn),
        psycopg2.connect(postgres_dsn),
        pg8000.native.Connection(**pg8000_params(postgres_dsn)),
    ]
    conns.append(conns)  # a cycle: only the collector frees them
    assert meter.open == 3
    del conns
    gc.collect()
    meter.sweep()
    assert meter.open == 0


#: Connect/close rounds per route: the server's backend exit races the next connect.
CLOSE_ROUNDS = 20


def _psycopg_round(dsn: str) -> int:
    conn = psycopg.connect(dsn)
    pid = conn.info.backend_pid
    conn.close()
    return pid


def _psycopg_async_round(dsn: str) -> int:
    async def use() -> int:
        conn = await psycopg.AsyncConnection.connect(dsn)
        pid = conn.info.backend_pid
        await conn.close()
        return pid

    return asyncio.run(use())


def _sqlalchemy_psycopg2_round(dsn: str) -> int:
    engine = create_engine(make_url(dsn).set(drivername="postgresql+psycopg2"))
    with engine.connect() as conn:
        pid = int(conn.execute(text("select pg_backend_pid()")).scalar_one())
    engine.dispose()
    return pid


def _psycopg2_round(dsn: str) -> int:
    conn = psycopg2.connect(dsn)  # no close hook: a sweep notices the close
    pid = int(conn.get_backend_pid())
    conn.close()
    return pid


def _asyncpg_round(dsn: str) -> int:
    async def use() -> int:
        conn = await asyncpg.connect(dsn)
        pid = int(conn.get_server_pid())
        await conn.close()
        return pid

    return asyncio.run(use())


def _asyncpg_terminate_round(dsn: str) -> int:
    async def use() -> int:
        conn = await asyncpg.connect(dsn)
        pid = int(conn.get_server_pid())
        conn.terminate()  # no Terminate message: the socket is just dropped
        return pid

    return asyncio.run(use())


def _asyncpg_pool_terminate_round(dsn: str) -> int:
    async def use() -> int:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        pid = int(await pool.fetchval("select pg_backend_pid()"))
        pool.terminate()
        return pid

    return asyncio.run(use())


def pg8000_params(dsn: str) -> dict[str, Any]:
    """pg8000's keyword arguments for a libpq DSN (pg8000 reads no DSN of its own)."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    found = {
        "user": params["user"],
        "host": params.get("host", "localhost"),
        "port": int(params.get("port") or 5432),
        "database": params.get("dbname"),
        "password": params.get("password"),
    }
    return {name: value for name, value in found.items() if value is not None}


def _pg8000_dbapi_round(dsn: str) -> int:
    conn = pg8000.dbapi.connect(**pg8000_params(dsn))
    cursor = conn.cursor()
    cursor.execute("select pg_backend_pid()")
    pid = int(cursor.fetchone()[0])
    conn.close()
    return pid


def _pg8000_native_round(dsn: str) -> int:
    with pg8000.native.Connection(**pg8000_params(dsn)) as conn:
        return int(conn.run("select pg_backend_pid()")[0][0])


def _collected_round(dsn: str) -> int:
    conns: list[Any] = [psycopg.connect(dsn)]
    pid = int(conns[0].info.backend_pid)
    conns.append(conns)  # a cycle: only the collector frees it
    del conns
    gc.collect()
    return pid


def _collected_asyncpg_round(dsn: str) -> int:
    async def use() -> int:
        conns: list[Any] = [await asyncpg.connect(dsn)]
        pid = int(conns[0].get_server_pid())
        conns.append(conns)
        del conns
        gc.collect()
        return pid

    return asyncio.run(use())


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "round_trip",
    [
        _psycopg_round,
        _psycopg_async_round,
        _sqlalchemy_psycopg2_round,
        _psycopg2_round,
        _asyncpg_round,
        _asyncpg_terminate_round,
        _asyncpg_pool_terminate_round,
        _pg8000_dbapi_round,
        _pg8000_native_round,
        _collected_round,
        _collected_asyncpg_round,
    ],
)
def test_a_close_is_counted_once_the_server_no_longer_counts_the_backend(
    metered: tuple[PoolMeter, Seen],
    postgres_dsn: str,
    limited_role: Any,
    round_trip: Any,
) -> None:
    """Another worker may be granted the slot as soon as a close is counted: by then the
    server must have freed it, or a role limited to the budget refuses that worker."""
    meter, _ = metered
    dsn = limited_role(1)
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        for _ in range(CLOSE_ROUNDS):
            pid = round_trip(dsn)  # a refused connect raises here
            meter.sweep()  # as before a gate: returns once the closes are reported
            assert meter.open == 1  # the admin connection
            listed = admin.execute("select count(*) from pg_stat_activity where pid = %s", (pid,))
            assert listed.fetchone() == (0,)


def test_psycopg2_counted_and_closed(metered: tuple[PoolMeter, Seen], postgres_dsn: str) -> None:
    meter, seen = metered
    conn = psycopg2.connect(postgres_dsn)
    assert meter.pids() == [conn.get_backend_pid()]
    conn.close()
    meter.sweep()
    assert (meter.open, seen.gates) == (0, [False])


def test_sqlalchemy_and_driver_count_once(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, seen = metered
    url = postgres_dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    for pool_class in (None, NullPool):
        kwargs = {} if pool_class is None else {"poolclass": pool_class}
        engine = create_engine(url, **kwargs)
        meter.begin(0)
        with engine.connect() as a, engine.connect() as b:
            a.execute(text("select 1"))
            b.execute(text("select 1"))
            assert (meter.open, meter.checked_out) == (2, 2)
        assert meter.end().need == 2
        assert meter.checked_out == 0
        meter.release_idle()
        assert meter.open == 0
        engine.dispose()
    assert seen.gates == [False] * 4  # once per connection, at the driver


def test_psycopg_pool_idle_not_in_use_and_reclaimed(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, seen = metered
    with ConnectionPool(postgres_dsn, min_size=3, max_size=4, open=True) as pool:
        pool.wait()
        assert (meter.open, meter.checked_out) == (3, 0)
        assert seen.gates == [True] * 3  # the pool's own threads: delayed, never refused
        meter.begin(0)
        with pool.connection() as conn:
            conn.execute("select 1")
            assert meter.checked_out == 1
        assert (meter.end().need, meter.checked_out) == (1, 0)
        meter.release_idle()  # below min_size too
        assert meter.open == 0
        with pool.connection() as conn:  # the pool still serves
            assert conn.execute("select 1").fetchone() == (1,)
        # ...and grows back to min_size in its own threads (psycopg_pool 3.1 would leak
        # a connection added while it closes).
        pool.wait()
        assert (meter.open, meter.checked_out) == (3, 0)
    meter.sweep()
    assert meter.open == 0


def test_async_psycopg_pool_reclaimed_on_its_loop(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, seen = metered

    async def use() -> None:
        async with AsyncConnectionPool(postgres_dsn, min_size=2, open=False) as pool:
            await pool.wait()
            assert (meter.open, meter.checked_out) == (2, 0)
            async with pool.connection() as conn:
                assert meter.checked_out == 1
                await conn.execute("select 1")
            await meter.release_idle_async()
            assert meter.open == 0
            async with pool.connection() as conn:
                await conn.execute("select 1")
            await pool.wait()
            assert meter.open == 2
        assert meter.open == 0

    asyncio.run(use())
    assert set(seen.async_gates) == {True}


def test_asyncpg_connect_pool_terminate_and_reclaim(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, seen = metered

    async def use() -> None:
        conn = await asyncpg.connect(postgres_dsn)
        assert meter.pids() == [conn.get_server_pid()]
        await conn.close()
        assert meter.open == 0

        pool = await asyncpg.create_pool(postgres_dsn, min_size=3, max_size=3)
        assert (meter.open, meter.checked_out) == (3, 0)
        meter.begin(0)
        async with pool.acquire() as a, pool.acquire() as b:
            await a.fetchval("select 1")
            await b.fetchval("select 1")
            assert meter.checked_out == 2
        assert (meter.end().need, meter.checked_out) == (2, 0)
        await meter.release_idle_async()  # below min_size too
        assert meter.open == 0
        # Not refilled behind our back: asyncpg (0.32+) reopens connections up to
        # min_size only in a task it starts when one closes; none is under way (and
        # none finished: nothing is open).
        assert getattr(pool, "_maintenance_task", None) is None
        assert await pool.fetchval("select 1") == 1  # the pool still serves
        pool.terminate()
        await meter.release_idle_async()  # returns once the terminated one is reported
        assert meter.open == 0

    asyncio.run(use())
    # Each connect awaited the gate once: the bare one, the pool's three, the reconnect.
    assert len(seen.async_gates) == 5
    assert seen.gates == []


def test_asyncpg_pool_released_from_outside_its_loop(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, _ = metered
    loop = asyncio.new_event_loop()
    try:

        async def make() -> asyncpg.Pool:
            return await asyncpg.create_pool(postgres_dsn, min_size=2)

        pool = loop.run_until_complete(make())
        assert meter.open == 2
        meter.release_idle()  # the loop is idle: run on it
        assert meter.open == 0
        loop.run_until_complete(pool.close())
    finally:
        loop.close()


def test_a_connection_kept_past_the_test_is_a_leak(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, _ = metered
    meter.begin(7)
    meter.call_started()
    kept = psycopg.connect(postgres_dsn)
    closed = psycopg.connect(postgres_dsn)
    closed.close()
    meter.call_ended()
    assert meter.end().leaks == 1
    kept.close()


class LoopbackChannel:
    """The side channel's worker end, answered by the test from another thread."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.callback: Any = None
        self.has_sent = threading.Event()

    def setcallback(self, callback: Any, endmarker: Any = None) -> None:
        self.callback = callback

    def send(self, message: Any) -> None:
        self.sent.append(message)
        self.has_sent.set()


def test_an_awaited_gate_keeps_its_loop_running_and_releases_on_it() -> None:
    channel = LoopbackChannel()
    link = WorkerLink(channel)  # type: ignore[arg-type]  # the channel's two calls used
    released: list[bool] = []
    has_released = threading.Event()
    ticks = 0

    async def release() -> None:
        released.append(asyncio.get_running_loop() is loop)
        has_released.set()

    async def other_coroutine() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async def connect() -> Answer | None:
        ticker = asyncio.ensure_future(other_coroutine())
        try:
            return await link.request_async(3, 30.0, release, background=True)
        finally:
            ticker.cancel()

    def controller() -> None:
        if channel.has_sent.wait(10):
            channel.callback(ReleaseIdle().to_wire())
        if has_released.wait(10):
            channel.callback(RequestAnswer(1, Answer.GRANTED).to_wire())

    loop = asyncio.new_event_loop()
    answering = threading.Thread(target=controller)
    answering.start()
    try:
        assert loop.run_until_complete(connect()) is Answer.GRANTED
    finally:
        answering.join()
        loop.close()
    assert [decode(wire) for wire in channel.sent] == [RoomRequest(1, None, 3, background=True)]
    assert released == [True]  # on the loop that was waiting
    assert ticks > 0  # the loop's other coroutines ran while the connect waited


class OpensDuringTheQuery:
    """The monitor's connection, with a worker's connection opened while each of its
    queries runs (after the server's snapshot, before the answer is back)."""

    def __init__(self, conn: psycopg.Connection[Any], dsn: str) -> None:
        self._conn, self._dsn = conn, dsn
        self.opened: list[psycopg.Connection[Any]] = []

    def execute(self, query: Any, params: Any = None) -> Any:
        cursor = self._conn.execute(query, params)
        self.opened.append(psycopg.connect(self._dsn))
        return cursor


def test_a_connection_opened_while_the_server_is_sampled_is_not_taken_for_ended(
    metered: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, _ = metered
    with psycopg.connect(postgres_dsn, autocommit=True) as own:
        during = OpensDuringTheQuery(own, postgres_dsn)
        monitor = ServerMonitor(postgres_dsn, budget=5, connection=during)
        monitor.start()
        try:
            sample = monitor.pids_now()
            assert sample is not None
            late = during.opened[-1].info.backend_pid
            assert late not in sample[1]  # not in the server's snapshot...
            meter.reconcile(sample[1], before=sample[0])
            assert late in meter.pids()  # ...and still counted
        finally:
            monitor.stop()
            for conn in during.opened:
                conn.close()
