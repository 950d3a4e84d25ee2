"""Driver-level hooks: every PostgreSQL connection psycopg 3, psycopg2 and asyncpg open.

Pools and frameworks (SQLAlchemy, psycopg_pool, asyncpg.Pool, Django) all end in a few
places inside the drivers that are looked up when a connection is made: a classmethod on
the connection class, a module function looked up on its module. Wrapping those counts
every connection however it was opened, including through names a user imported before
the plugin loaded (``from psycopg import connect``). The wrappers hand what they see to a
``ConnectionSink`` (the worker's meter); they never decide anything themselves.

These are private internals of the drivers: each one is listed in ``HOOKED_INTERNALS``
with the versions it was checked against (public methods wrapped too, ``close``,
``getconn``, ``putconn``, are not), and ``DriverHooks`` installs a driver's hooks
only once the process has imported that driver (``sys.modules`` check plus an import
hook), so a worker that never imports asyncpg pays nothing for it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib.abc
import importlib.machinery
import os
import socket
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol


@dataclass(frozen=True)
class HookedInternal:
    """One private name of a driver that the hooks rely on."""

    driver: str
    name: str
    why: str
    checked: tuple[str, ...]  # driver versions it was checked against


#: Every private internal the hooks wrap or read, in one place. The oldest and newest
#: versions listed are the ones ``tests/test_drivers.py`` was run against.
HOOKED_INTERNALS: Final[tuple[HookedInternal, ...]] = (
    HookedInternal(
        "psycopg",
        "BaseConnection._connect_gen",
        "classmethod generator that builds each new connection (sync and async); "
        "wrapped to count the connection it returns",
        ("3.1.18", "3.3.9"),
    ),
    HookedInternal(
        "psycopg",
        "Connection._get_connection_params / AsyncConnection._get_connection_params",
        "classmethods called once per connect() before any attempt (the async one is "
        "awaited); wrapped to pass the connect gate",
        ("3.1.18", "3.3.9"),
    ),
    HookedInternal(
        "psycopg_pool",
        "ConnectionPool._connect / AsyncConnectionPool._connect",
        "where a pool opens its connections (from its own threads or tasks); wrapped to "
        "mark them as the pool's and never refuse them at the gate",
        ("3.1.9", "3.3.3"),
    ),
    HookedInternal(
        "psycopg_pool",
        "pool._lock, pool._pool, pool._nconns",
        "the idle deque, its lock and the connection count: idle reclaim takes the idle "
        "connections out under the lock, as the pool's own shrinking does",
        ("3.1.9", "3.3.3"),
    ),
    HookedInternal(
        "asyncpg",
        "connect_utils._connect",
        "module function every connect ends in (asyncpg.connect, Pool, SQLAlchemy); "
        "wrapped to await the gate and count the connection",
        ("0.29.0", "0.32.0"),
    ),
    HookedInternal(
        "asyncpg",
        "Connection._cleanup",
        "run on close(), terminate() and when the server drops the connection; wrapped "
        "to uncount it",
        ("0.29.0", "0.32.0"),
    ),
    HookedInternal(
        "asyncpg",
        "Pool._get_new_connection, Pool._loop, Pool._holders, Pool._minsize, "
        "Pool._maintenance_task (0.32)",
        "where a pool opens connections (marked as the pool's; its min-size maintenance "
        "task's are never refused); its loop, holders and floor for idle reclaim",
        ("0.29.0", "0.32.0"),
    ),
    HookedInternal(
        "asyncpg",
        "PoolConnectionHolder.acquire / release, holder._con, holder._in_use",
        "lending a pooled connection out and back: which ones are checked out",
        ("0.29.0", "0.32.0"),
    ),
    HookedInternal(
        "asyncpg",
        "Connection._addr, Connection._params (user, password, database)",
        "read by ``login`` when no DSN is given: the server and login of the first "
        "connection, for the plugin's own connection",
        ("0.29.0", "0.32.0"),
    ),
    HookedInternal(
        "psycopg2",
        "psycopg2._connect",
        "the C function psycopg2.connect() looks up on its module at call time; wrapped "
        "to pass the gate and count the connection",
        ("2.9.9", "2.9.13"),
    ),
)

#: Modules whose first import installs their hooks.
DRIVER_MODULES: Final = ("psycopg", "psycopg_pool", "asyncpg", "psycopg2")

#: SQLAlchemy dialect driver names whose connections the hooks see (SQLAlchemy then only
#: says which ones are checked out).
SQLALCHEMY_DRIVERS: Final = {
    "psycopg": "psycopg",
    "psycopg_async": "psycopg",
    "psycopg2": "psycopg2",
    "asyncpg": "asyncpg",
}

#: The pool (any kind) opening a connection in this context: its connections start idle,
#: and a pool's background growth is delayed at the gate, never refused.
_POOL_OPENING: contextvars.ContextVar[tuple[Any, bool] | None] = contextvars.ContextVar(
    "poolaware_pool_opening", default=None
)

_ORIGINAL: Final = "__poolaware_original__"


class ConnectionSink(Protocol):
    """What the hooks report to (the worker's meter)."""

    def gate(self, background: bool) -> None:
        """Before a new connection: may block until the budget has room."""

    def gate_async(self, background: bool) -> Awaitable[None]:
        """The same for a connect on an event loop: waits by awaiting."""

    def opened(
        self, conn: Any, pid: int, driver: str, pool: Any, closed: Callable[[Any], bool]
    ) -> None:
        """A connection is open (``pool``: the pool that opened it, or None)."""

    def closed(self, conn: Any) -> None:
        """A counted connection was closed."""

    def lent(self, conn: Any, in_use: bool) -> None:
        """A pool lent a connection out (True) or got it back (False)."""


# -- helpers shared by the hooks --------------------------------------------------------------


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _patch(owner: Any, name: str, wrapper: Any, undo: list[Callable[[], None]]) -> None:
    """Replace ``owner.name`` by ``wrapper`` (once), remembering how to put it back."""
    current = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    if getattr(_unwrap(current), _ORIGINAL, None) is not None:
        return  # already hooked (another agent in this process)
    setattr(_unwrap(wrapper), _ORIGINAL, current)
    setattr(owner, name, wrapper)
    undo.append(lambda: setattr(owner, name, current))


def _unwrap(obj: Any) -> Any:
    return obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj


def _definer(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO that defines ``name`` (where the hook must go)."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass
    raise AttributeError(f"{cls.__qualname__}.{name}")


class _Opening:
    """Marks connections opened in this context as a pool's (``background``: the pool's
    own growth, which the gate delays but never refuses)."""

    def __init__(self, pool: Any, background: bool) -> None:
        self._value = (pool, background)
        self._token: contextvars.Token[tuple[Any, bool] | None] | None = None

    def __enter__(self) -> None:
        self._token = _POOL_OPENING.set(self._value)

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _POOL_OPENING.reset(self._token)


def _opening_pool() -> Any:
    opening = _POOL_OPENING.get()
    return None if opening is None else opening[0]


def _background() -> bool:
    opening = _POOL_OPENING.get()
    return opening is not None and opening[1]


# -- a close is over once the server no longer counts the backend --------------------------------

#: Longest wait, after closing a connection, for its backend to exit. The server frees the
#: backend's slot (what a role's connection limit and max_connections count) only when
#: the backend process exits, a moment after the client's close.
BACKEND_EXIT_TIMEOUT: Final = 1.0
#: Bytes read at a time while waiting for the server's end of the socket to close.
_RECV_BYTES: Final = 4096


def watch_backend(fileno: Callable[[], int]) -> socket.socket | None:
    """A duplicate of a connection's socket, taken just before the client closes it.

    The server closes its end of the socket only once the backend process has exited, so
    end-of-file on the duplicate says the slot is free ("synchronous close"); the
    client's own close still sends its Terminate message, which ends the backend. None
    when the connection has no socket any more.
    """
    try:
        return socket.socket(fileno=os.dup(fileno()))
    except Exception:
        return None


def await_backend_exit(watch: socket.socket | None) -> None:
    """Wait (at most BACKEND_EXIT_TIMEOUT) for end-of-file on ``watch_backend``'s socket."""
    if watch is None:
        return
    with watch:
        deadline = time.monotonic() + BACKEND_EXIT_TIMEOUT
        try:
            while (left := deadline - time.monotonic()) > 0:
                watch.settimeout(left)
                if not watch.recv(_RECV_BYTES):
                    return
        except OSError:  # timed out, or reset: nothing more to wait for
            return


async def await_backend_exit_async(watch: socket.socket | None) -> None:
    """``await_backend_exit`` on an event loop, which keeps running meanwhile."""
    if watch is None:
        return
    with watch:
        watch.setblocking(False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BACKEND_EXIT_TIMEOUT
        try:
            while (left := deadline - loop.time()) > 0:
                if not await asyncio.wait_for(loop.sock_recv(watch, _RECV_BYTES), left):
                    return
        except (OSError, asyncio.TimeoutError):
            return


def close_awaiting_exit(conn: Any) -> None:
    """Close a libpq connection that has no close hook (psycopg2's) and return once its
    backend has exited; closing it again is a no-op."""
    watch = watch_backend(conn.fileno)
    conn.close()
    await_backend_exit(watch)


#: Drivers whose close hook reports a close only once the backend has exited.
CLOSE_AWAITS_EXIT: Final = frozenset({"psycopg"})


# -- psycopg 3 ----------------------------------------------------------------------------------


def _psycopg_closed(conn: Any) -> bool:
    return bool(conn.closed)


def _install_psycopg(sink: ConnectionSink, undo: list[Callable[[], None]]) -> None:
    import psycopg

    base = _definer(psycopg.Connection, "_connect_gen")
    connect_gen = base.__dict__["_connect_gen"].__func__

    def _connect_gen(cls: Any, *args: Any, **kwargs: Any) -> Any:
        conn = yield from connect_gen(cls, *args, **kwargs)
        sink.opened(conn, conn.info.backend_pid, "psycopg", _opening_pool(), _psycopg_closed)
        return conn

    _patch(base, "_connect_gen", classmethod(_connect_gen), undo)

    sync_owner = _definer(psycopg.Connection, "_get_connection_params")
    sync_params = sync_owner.__dict__["_get_connection_params"].__func__

    def _get_connection_params(cls: Any, *args: Any, **kwargs: Any) -> Any:
        sink.gate(_background())
        return sync_params(cls, *args, **kwargs)

    _patch(sync_owner, "_get_connection_params", classmethod(_get_connection_params), undo)

    async_owner = _definer(psycopg.AsyncConnection, "_get_connection_params")
    async_params = async_owner.__dict__["_get_connection_params"].__func__

    async def _get_connection_params_async(cls: Any, *args: Any, **kwargs: Any) -> Any:
        await sink.gate_async(_background())
        return await async_params(cls, *args, **kwargs)

    _patch(async_owner, "_get_connection_params", classmethod(_get_connection_params_async), undo)

    sync_close = psycopg.Connection.__dict__["close"]

    @functools.wraps(sync_close)
    def close(self: Any) -> None:
        watch = None if self.closed else watch_backend(self.fileno)
        try:
            sync_close(self)
        finally:
            if self.closed:
                await_backend_exit(watch)
                sink.closed(self)
            elif watch is not None:
                watch.close()

    _patch(psycopg.Connection, "close", close, undo)

    async_close = psycopg.AsyncConnection.__dict__["close"]

    @functools.wraps(async_close)
    async def close_async(self: Any) -> None:
        watch = None if self.closed else watch_backend(self.fileno)
        try:
            await async_close(self)
        finally:
            if self.closed:
                await await_backend_exit_async(watch)
                sink.closed(self)
            elif watch is not None:
                watch.close()

    _patch(psycopg.AsyncConnection, "close", close_async, undo)


# -- psycopg_pool -------------------------------------------------------------------------------


def _install_psycopg_pool(sink: ConnectionSink, undo: list[Callable[[], None]]) -> None:
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

    connect = ConnectionPool.__dict__["_connect"]

    @functools.wraps(connect)
    def _connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _Opening(self, background=True):
            return connect(self, *args, **kwargs)

    _patch(ConnectionPool, "_connect", _connect, undo)

    connect_async = AsyncConnectionPool.__dict__["_connect"]

    @functools.wraps(connect_async)
    async def _connect_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _Opening(self, background=True):
            return await connect_async(self, *args, **kwargs)

    _patch(AsyncConnectionPool, "_connect", _connect_async, undo)

    getconn = ConnectionPool.__dict__["getconn"]

    @functools.wraps(getconn)
    def _getconn(self: Any, *args: Any, **kwargs: Any) -> Any:
        conn = getconn(self, *args, **kwargs)
        sink.lent(conn, True)
        return conn

    _patch(ConnectionPool, "getconn", _getconn, undo)

    putconn = ConnectionPool.__dict__["putconn"]

    @functools.wraps(putconn)
    def _putconn(self: Any, conn: Any) -> None:
        sink.lent(conn, False)
        putconn(self, conn)

    _patch(ConnectionPool, "putconn", _putconn, undo)

    getconn_async = AsyncConnectionPool.__dict__["getconn"]

    @functools.wraps(getconn_async)
    async def _getconn_async(self: Any, *args: Any, **kwargs: Any) -> Any:
        conn = await getconn_async(self, *args, **kwargs)
        sink.lent(conn, True)
        return conn

    _patch(AsyncConnectionPool, "getconn", _getconn_async, undo)

    putconn_async = AsyncConnectionPool.__dict__["putconn"]

    @functools.wraps(putconn_async)
    async def _putconn_async(self: Any, conn: Any) -> None:
        sink.lent(conn, False)
        await putconn_async(self, conn)

    _patch(AsyncConnectionPool, "putconn", _putconn_async, undo)


def _take_idle_psycopg(pool: Any) -> list[Any]:
    """Take every idle connection out of a psycopg_pool (its lock held by the caller), as
    its own shrinking does: the pool then counts them gone and regrows on demand."""
    idle = list(pool._pool)
    pool._pool.clear()
    pool._nconns -= len(idle)
    if hasattr(pool, "_nconns_min"):
        pool._nconns_min = 0
    return idle


def reclaim_psycopg_pool(pool: Any) -> int:
    """Close a sync psycopg_pool's idle connections now (below ``min_size`` too)."""
    with pool._lock:
        idle = _take_idle_psycopg(pool)
    for conn in idle:
        conn._pool = None
        conn.close()
    return len(idle)


async def reclaim_async_psycopg_pool(pool: Any) -> int:
    """The same for an ``AsyncConnectionPool``, on its own event loop."""
    async with pool._lock:
        idle = _take_idle_psycopg(pool)
    for conn in idle:
        conn._pool = None
        await conn.close()
    return len(idle)


# -- asyncpg ------------------------------------------------------------------------------------


def _asyncpg_closed(conn: Any) -> bool:
    return bool(conn.is_closed())


def _install_asyncpg(sink: ConnectionSink, undo: list[Callable[[], None]]) -> None:
    from asyncpg import connect_utils
    from asyncpg.connection import Connection
    from asyncpg.pool import Pool, PoolConnectionHolder

    connect = connect_utils._connect

    @functools.wraps(connect)
    async def _connect(*args: Any, **kwargs: Any) -> Any:
        pool = _opening_pool()
        await sink.gate_async(_background())
        conn = await connect(*args, **kwargs)
        sink.opened(conn, conn.get_server_pid(), "asyncpg", pool, _asyncpg_closed)
        return conn

    _patch(connect_utils, "_connect", _connect, undo)

    cleanup = Connection.__dict__["_cleanup"]

    @functools.wraps(cleanup)
    def _cleanup(self: Any) -> None:
        sink.closed(self)
        cleanup(self)

    _patch(Connection, "_cleanup", _cleanup, undo)

    new_connection = Pool.__dict__["_get_new_connection"]

    @functools.wraps(new_connection)
    async def _get_new_connection(self: Any) -> Any:
        task = asyncio.current_task()
        maintenance = getattr(self, "_maintenance_task", None)
        with _Opening(self, background=task is not None and task is maintenance):
            return await new_connection(self)

    _patch(Pool, "_get_new_connection", _get_new_connection, undo)

    acquire = PoolConnectionHolder.__dict__["acquire"]

    @functools.wraps(acquire)
    async def _acquire(self: Any) -> Any:
        proxy = await acquire(self)
        sink.lent(self._con, True)
        return proxy

    _patch(PoolConnectionHolder, "acquire", _acquire, undo)

    release = PoolConnectionHolder.__dict__["release"]

    @functools.wraps(release)
    async def _release(self: Any, *args: Any, **kwargs: Any) -> None:
        if self._con is not None:
            sink.lent(self._con, False)
        await release(self, *args, **kwargs)

    _patch(PoolConnectionHolder, "release", _release, undo)


def reclaim_asyncpg_pool(pool: Any) -> int:
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


# -- psycopg2 -----------------------------------------------------------------------------------


def _psycopg2_closed(conn: Any) -> bool:
    return bool(conn.closed)


def _install_psycopg2(sink: ConnectionSink, undo: list[Callable[[], None]]) -> None:
    import psycopg2

    connect = psycopg2._connect

    def _connect(*args: Any, **kwargs: Any) -> Any:
        sink.gate(False)
        conn = connect(*args, **kwargs)
        if not conn.async_:  # an asynchronous connection has no backend until polled
            sink.opened(conn, conn.get_backend_pid(), "psycopg2", None, _psycopg2_closed)
        return conn

    _patch(psycopg2, "_connect", _connect, undo)


_INSTALLERS: Final[dict[str, Callable[[ConnectionSink, list[Callable[[], None]]], None]]] = {
    "psycopg": _install_psycopg,
    "psycopg_pool": _install_psycopg_pool,
    "asyncpg": _install_asyncpg,
    "psycopg2": _install_psycopg2,
}


# -- installing lazily ---------------------------------------------------------------------------


class _NotifyingLoader(importlib.abc.Loader):
    """Runs the real loader, then says the module is in (the driver can be hooked)."""

    def __init__(self, loader: Any, name: str, on_loaded: Callable[[str], None]) -> None:
        self._loader = loader
        self._name = name
        self._on_loaded = on_loaded

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._loader, attr)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        create: Callable[[importlib.machinery.ModuleSpec], types.ModuleType | None] | None
        create = getattr(self._loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        self._on_loaded(self._name)


class _ImportWatcher(importlib.abc.MetaPathFinder):
    """Notices the first import of a driver module (any other name costs one set lookup)."""

    def __init__(self, names: frozenset[str], on_loaded: Callable[[str], None]) -> None:
        self._names = names
        self._on_loaded = on_loaded

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec: importlib.machinery.ModuleSpec | None = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _NotifyingLoader(spec.loader, fullname, self._on_loaded)
            return spec
        return None


class DriverHooks:
    """Installs the hooks of each driver the process imports, once, and removes them.

    Errors while hooking (a driver release that changed the internals in
    ``HOOKED_INTERNALS``) leave that driver unhooked and are handed to ``on_error``.
    """

    def __init__(self, sink: ConnectionSink, on_error: Callable[[BaseException], None]) -> None:
        self._sink = sink
        self._on_error = on_error
        self._undo: list[Callable[[], None]] = []
        self._hooked: set[str] = set()
        self._watcher: _ImportWatcher | None = None
        self._lock = threading.RLock()

    @property
    def hooked(self) -> frozenset[str]:
        return frozenset(self._hooked)

    def install(self) -> None:
        """Hook the drivers already imported, and the others when they are imported."""
        with self._lock:
            if self._watcher is None:
                self._watcher = _ImportWatcher(frozenset(DRIVER_MODULES), self._loaded)
                sys.meta_path.insert(0, self._watcher)
            for name in DRIVER_MODULES:
                if name in sys.modules:
                    self._loaded(name)

    def _loaded(self, name: str) -> None:
        with self._lock:
            if name in self._hooked or self._watcher is None:
                return
            self._hooked.add(name)
            undo: list[Callable[[], None]] = []
            try:
                _INSTALLERS[name](self._sink, undo)
            except Exception as exc:
                for step in reversed(undo):
                    step()
                self._on_error(exc)
            else:
                self._undo.extend(undo)

    def uninstall(self) -> None:
        with self._lock:
            if self._watcher is not None:
                if self._watcher in sys.meta_path:
                    sys.meta_path.remove(self._watcher)
                self._watcher = None
            for step in reversed(self._undo):
                step()
            self._undo.clear()
            self._hooked.clear()

    def sees(self, sqlalchemy_driver: str) -> bool:
        """Whether connections of this SQLAlchemy dialect driver are counted here."""
        return SQLALCHEMY_DRIVERS.get(sqlalchemy_driver) in self._hooked
