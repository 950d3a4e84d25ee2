"""asyncpg: every connect ends in one module function, every close in one method.

``asyncpg.connect``, ``Pool`` and SQLAlchemy all end in ``connect_utils._connect``
(looked up on its module at call time): the gate is awaited there, so the loop keeps
running while the connect waits. ``Connection._cleanup`` runs on close, terminate and
when the server drops the connection; it must not block the loop, so a close whose
backend has not exited yet goes to the exit watcher's thread.
"""

from __future__ import annotations

import asyncio
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
from pytest_poolaware.worker.drivers.logins import server_address

INTERNALS: Final = (
    HookedInternal(
        "asyncpg",
        "connect_utils._connect",
        "module function every connect ends in (asyncpg.connect, Pool, SQLAlchemy); "
        "wrapped to await the gate and count the connection",
    ),
    HookedInternal(
        "asyncpg",
        "Connection._cleanup",
        "run on close(), terminate() and when the server drops the connection; wrapped "
        "to uncount it",
    ),
    HookedInternal(
        "asyncpg",
        "Connection._transport",
        "the connection's transport, whose socket is duplicated to see the backend exit",
    ),
    HookedInternal(
        "asyncpg",
        "Pool._get_new_connection, Pool._loop, Pool._holders, Pool._minsize, "
        "Pool._maintenance_task (0.32)",
        "where a pool opens connections (marked as the pool's; its min-size maintenance "
        "task's are never refused); its loop, holders and floor for idle reclaim",
    ),
    HookedInternal(
        "asyncpg",
        "PoolConnectionHolder.acquire / release, holder._con, holder._in_use",
        "lending a pooled connection out and back: which ones are checked out",
    ),
    HookedInternal(
        "asyncpg",
        "Connection._addr, Connection._params (user, password, database)",
        "read by ``login`` when no DSN is given: the server and login of the first "
        "connection, for the plugin's own connection",
    ),
)


def _install(hooking: Hooking) -> None:
    from asyncpg import connect_utils
    from asyncpg.connection import Connection

    connect = connect_utils._connect
    sink, exits = hooking.sink, hooking.exits

    @functools.wraps(connect)
    async def _connect(*args: Any, **kwargs: Any) -> Any:
        pool = opening_pool()
        await sink.gate_async(background())
        conn = await connect(*args, **kwargs)
        hooking.opened(conn, pool)
        return conn

    hooking.patch(connect_utils, "_connect", _connect)

    cleanup = Connection.__dict__["_cleanup"]

    @functools.wraps(cleanup)
    def _cleanup(self: Any) -> None:
        # Closed, terminated or dropped by the server: reported once the backend has
        # exited, by the exit watcher if not at once (never blocking this loop).
        exits.closed(self)
        cleanup(self)

    hooking.patch(Connection, "_cleanup", _cleanup)
    _install_pool(hooking)


def _install_pool(hooking: Hooking) -> None:
    from asyncpg.pool import Pool, PoolConnectionHolder

    sink = hooking.sink
    new_connection = Pool.__dict__["_get_new_connection"]

    @functools.wraps(new_connection)
    async def _get_new_connection(self: Any) -> Any:
        task = asyncio.current_task()
        maintenance = getattr(self, "_maintenance_task", None)
        with Opening(self, background=task is not None and task is maintenance):
            return await new_connection(self)

    hooking.patch(Pool, "_get_new_connection", _get_new_connection)

    acquire = PoolConnectionHolder.__dict__["acquire"]

    @functools.wraps(acquire)
    async def _acquire(self: Any) -> Any:
        proxy = await acquire(self)
        sink.lent(self._con, True)
        return proxy

    hooking.patch(PoolConnectionHolder, "acquire", _acquire)

    release = PoolConnectionHolder.__dict__["release"]

    @functools.wraps(release)
    async def _release(self: Any, *args: Any, **kwargs: Any) -> None:
        if self._con is not None:
            sink.lent(self._con, False)
        await release(self, *args, **kwargs)

    hooking.patch(PoolConnectionHolder, "release", _release)


def terminate_idle(pool: Any) -> int:
    """Terminate an asyncpg pool's idle connections (call on the pool's loop).

    ``expire_connections()`` only replaces them on next use; this closes them now. The
    pool's floor is set to 0 meanwhile, so asyncpg (0.32+) does not reopen them at once
    to keep ``min_size``; an emptied holder reconnects on its next acquire.
    """
    idle = [
        holder._con
        for holder in pool._holders
        if holder._con is not None and holder._in_use is None and not holder._con.is_closed()
    ]
    floor = pool._minsize
    pool._minsize = 0
    try:
        for conn in idle:
            conn.terminate()
    finally:
        pool._minsize = floor
    return len(idle)


#: Loop turns given to terminated transports to finish closing, so the server sees
#: them go now rather than at the loop's next use.
_CLOSING_TURNS: Final = 2


async def reclaim_pool(pool: Any) -> int:
    """``terminate_idle`` on the pool's loop (this one), letting the closes go out."""
    closed = terminate_idle(pool)
    if closed:
        for _ in range(_CLOSING_TURNS):
            await asyncio.sleep(0)
    return closed


def _login(conn: Any) -> ServerSeen | None:
    """``conn._addr`` (``(host, port)``, or a socket file's path) and ``conn._params``
    (user, password, database)."""
    address = server_address(conn._addr)
    if address is None:
        return None
    params = conn._params
    password = params.password
    return ServerSeen(
        host=address[0],
        port=address[1],
        dbname=str(params.database),
        user=str(params.user),
        # A callable password (asyncpg 0.28+) is the application's secret provider.
        password=password if isinstance(password, str) and password else None,
        driver=ASYNCPG.name,
        pid=int(conn.get_server_pid()),
    )


ASYNCPG: Final = Driver(
    name="asyncpg",
    hooks=(Hook("asyncpg", _install),),
    sqlalchemy=("asyncpg",),
    backend_pid=lambda conn: int(conn.get_server_pid()),
    fileno=lambda conn: int(conn._transport.get_extra_info("socket").fileno()),
    is_closed=lambda conn: bool(conn.is_closed()),
    close_hooked=True,
    login=_login,
    internals=INTERNALS,
    reclaim_async=reclaim_pool,
)
