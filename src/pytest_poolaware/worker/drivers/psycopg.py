"""psycopg 3 (sync and asyncio) and its pools, psycopg_pool.

psycopg builds every connection in one classmethod generator, and calls a classmethod
once per ``connect()`` before any attempt: the count and the gate go there. Its
``close()`` is hooked, so a close waits (or awaits) for the backend to exit. A
psycopg_pool opens connections from its own threads or tasks: marked as the pool's,
they start idle and their gate requests are background ones.
"""

from __future__ import annotations

import functools
from typing import Any, Final

from pytest_poolaware.shared.protocol import ServerSeen
from pytest_poolaware.worker.drivers.base import (
    Driver,
    Hook,
    HookedInternal,
    Hooking,
    Opening,
    background,
    opening_pool,
)
from pytest_poolaware.worker.drivers.logins import from_libpq
from pytest_poolaware.worker.drivers.patching import definer

INTERNALS: Final = (
    HookedInternal(
        "psycopg",
        "BaseConnection._connect_gen",
        "classmethod generator that builds each new connection (sync and async); "
        "wrapped to count the connection it returns",
    ),
    HookedInternal(
        "psycopg",
        "Connection._get_connection_params / AsyncConnection._get_connection_params",
        "classmethods called once per connect() before any attempt (the async one is "
        "awaited); wrapped to pass the connect gate",
    ),
    HookedInternal(
        "psycopg-pool",
        "ConnectionPool._connect / AsyncConnectionPool._connect",
        "where a pool opens its connections (from its own threads or tasks); wrapped to "
        "mark them as the pool's and never refuse them at the gate",
    ),
    HookedInternal(
        "psycopg-pool",
        "pool._lock, pool._pool, pool._nconns",
        "the idle deque, its lock and the connection count: idle reclaim takes the idle "
        "connections out under the lock, as the pool's own shrinking does",
    ),
)


def _closed(conn: Any) -> bool:
    return bool(conn.closed)


def _install(hooking: Hooking) -> None:
    import psycopg

    base = definer(psycopg.Connection, "_connect_gen")
    connect_gen = base.__dict__["_connect_gen"].__func__

    def _connect_gen(cls: Any, *args: Any, **kwargs: Any) -> Any:
        conn = yield from connect_gen(cls, *args, **kwargs)
        hooking.opened(conn, opening_pool())
        return conn

    hooking.patch(base, "_connect_gen", classmethod(_connect_gen))
    _install_gates(hooking, psycopg)
    _install_closes(hooking, psycopg)


def _install_gates(hooking: Hooking, psycopg: Any) -> None:
    sink = hooking.sink
    sync_owner = definer(psycopg.Connection, "_get_connection_params")
    sync_params = sync_owner.__dict__["_get_connection_params"].__func__

    def _get_connection_params(cls: Any, *args: Any, **kwargs: Any) -> Any:
        sink.gate(background())
        return sync_params(cls, *args, **kwargs)

    hooking.patch(sync_owner, "_get_connection_params", classmethod(_get_connection_params))

    async_owner = definer(psycopg.AsyncConnection, "_get_connection_params")
    async_params = async_owner.__dict__["_get_connection_params"].__func__

    async def _get_connection_params_async(cls: Any, *args: Any, **kwargs: Any) -> Any:
        await sink.gate_async(background())
        return await async_params(cls, *args, **kwargs)

    hooking.patch(async_owner, "_get_connection_params", classmethod(_get_connection_params_async))


def _install_closes(hooking: Hooking, psycopg: Any) -> None:
    exits = hooking.exits
    sync_close = psycopg.Connection.__dict__["close"]

    @functools.wraps(sync_close)
    def close(self: Any) -> None:
        try:
            sync_close(self)
        finally:
            if self.closed:
                exits.closed_sync(self)

    hooking.patch(psycopg.Connection, "close", close)

    async_close = psycopg.AsyncConnection.__dict__["close"]

    @functools.wraps(async_close)
    async def close_async(self: Any) -> None:
        try:
            await async_close(self)
        finally:
            if self.closed:
                await exits.closed_async(self)

    hooking.patch(psycopg.AsyncConnection, "close", close_async)


# -- psycopg_pool -------------------------------------------------------------------------------


def _install_pool(hooking: Hooking) -> None:
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

    connect = ConnectionPool.__dict__["_connect"]

    @functools.wraps(connect)
    def _connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        with Opening(self, background=True):
            return connect(self, *args, **kwargs)

    hooking.patch(ConnectionPool, "_connect", _connect)

    connect_async = AsyncConnectionPool.__dict__["_connect"]

    @functools.wraps(connect_async)
    async def _connect_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        with Opening(self, background=True):
            return await connect_async(self, *args, **kwargs)

    hooking.patch(AsyncConnectionPool, "_connect", _connect_async)
    _install_lending(hooking, ConnectionPool, AsyncConnectionPool)


def _install_lending(hooking: Hooking, sync_pool: type, async_pool: type) -> None:
    sink = hooking.sink
    getconn = sync_pool.__dict__["getconn"]

    @functools.wraps(getconn)
    def _getconn(self: Any, *args: Any, **kwargs: Any) -> Any:
        conn = getconn(self, *args, **kwargs)
        sink.lent(conn, True)
        return conn

    hooking.patch(sync_pool, "getconn", _getconn)

    putconn = sync_pool.__dict__["putconn"]

    @functools.wraps(putconn)
    def _putconn(self: Any, conn: Any) -> None:
        sink.lent(conn, False)
        putconn(self, conn)

    hooking.patch(sync_pool, "putconn", _putconn)

    getconn_async = async_pool.__dict__["getconn"]

    @functools.wraps(getconn_async)
    async def _getconn_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        conn = await getconn_async(self, *args, **kwargs)
        sink.lent(conn, True)
        return conn

    hooking.patch(async_pool, "getconn", _getconn_async)

    putconn_async = async_pool.__dict__["putconn"]

    @functools.wraps(putconn_async)
    async def _putconn_async(self: Any, conn: Any) -> None:
        sink.lent(conn, False)
        await putconn_async(self, conn)

    hooking.patch(async_pool, "putconn", _putconn_async)


def _take_idle(pool: Any) -> list[Any]:
    """Take every idle connection out of a psycopg_pool (its lock held by the caller), as
    its own shrinking does: the pool then counts them gone and regrows on demand."""
    idle = list(pool._pool)
    pool._pool.clear()
    pool._nconns -= len(idle)
    if hasattr(pool, "_nconns_min"):
        pool._nconns_min = 0
    return idle


def reclaim_pool(pool: Any) -> int:
    """Close a sync psycopg_pool's idle connections now (below ``min_size`` too)."""
    with pool._lock:
        idle = _take_idle(pool)
    for conn in idle:
        conn._pool = None
        conn.close()
    return len(idle)


async def reclaim_async_pool(pool: Any) -> int:
    """The same for an ``AsyncConnectionPool``, on its own event loop."""
    async with pool._lock:
        idle = _take_idle(pool)
    for conn in idle:
        conn._pool = None
        await conn.close()
    return len(idle)


def _login(conn: Any) -> ServerSeen:
    return from_libpq(conn.info, PSYCOPG.name)


PSYCOPG: Final = Driver(
    name="psycopg",
    hooks=(Hook("psycopg", _install), Hook("psycopg_pool", _install_pool)),
    sqlalchemy=("psycopg", "psycopg_async"),
    backend_pid=lambda conn: int(conn.info.backend_pid),
    fileno=lambda conn: int(conn.fileno()),
    is_closed=_closed,
    close_hooked=True,
    login=_login,
    internals=INTERNALS,
    reclaim=reclaim_pool,
    reclaim_async=reclaim_async_pool,
)
