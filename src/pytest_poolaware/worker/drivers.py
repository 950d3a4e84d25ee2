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

A close is reported only once the server has let the connection's backend go
(``BackendExits``): until then the server still counts it against the login's limit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import importlib.abc
import importlib.machinery
import os
import select
import socket
import sys
import threading
import types
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from pytest_poolaware.shared.clock import bounded, monotonic


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
        ("3.1.0", "3.3.9"),
    ),
    HookedInternal(
        "psycopg",
        "Connection._get_connection_params / AsyncConnection._get_connection_params",
        "classmethods called once per connect() before any attempt (the async one is "
        "awaited); wrapped to pass the connect gate",
        ("3.1.0", "3.3.9"),
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
        "Connection._transport",
        "the connection's transport, whose socket is duplicated to see the backend exit",
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

    def opened(self, conn: Any, pid: int, driver: str, pool: Any) -> None:
        """A connection is open (``pool``: the pool that opened it, or None)."""

    def closed(self, pid: int, key: int) -> None:
        """The connection ``key`` (its ``id()`` when it opened) with backend ``pid`` was
        closed and its backend has exited (or BACKEND_EXIT_TIMEOUT passed)."""

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

#: Longest wait, after a connection is closed, for its backend to exit. The server frees
#: the backend's slot (what a role's connection limit and max_connections count) only
#: when the backend process exits, a moment after the client's close.
BACKEND_EXIT_TIMEOUT: Final = 1.0
#: Bytes read at a time while waiting for the server's end of the socket to close.
_RECV_BYTES: Final = 4096
#: Longest wait, when the hooks are removed, for the exit watcher's thread to stop.
_WATCHER_STOP_TIMEOUT: Final = 5.0


class _Watch:
    """One counted connection's socket, duplicated when the connection opened."""

    __slots__ = ("deadline", "finalizer", "is_closed", "key", "pid", "ref", "sock")

    def __init__(
        self,
        conn: Any,
        pid: int,
        sock: socket.socket | None,
        is_closed: Callable[[Any], bool],
    ) -> None:
        self.pid = pid
        self.key = id(conn)
        self.ref = weakref.ref(conn)
        self.sock = sock
        self.is_closed = is_closed
        self.deadline = 0.0
        self.finalizer: Any = None

    def hang_up(self) -> None:
        """The client is done with the connection: end our side of the socket too.

        The duplicate keeps the socket open, so a client that drops its socket without
        a Terminate message (asyncpg's ``terminate()``, a collected connection) would
        otherwise leave the backend waiting for more; shutting the write side down sends
        the end-of-stream the backend exits on. What the client wrote before still goes
        out first.
        """
        if self.sock is None:
            return
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def exited_now(self) -> bool:
        """Whether the server's end is closed already (no wait)."""
        if self.sock is None:
            return True
        try:
            self.sock.setblocking(False)
            while True:
                if not self.sock.recv(_RECV_BYTES):
                    return True
        except BlockingIOError:
            return False
        except OSError:  # reset: the backend is gone
            return True

    def await_exit(self) -> None:
        """Block until the server's end closes, at most BACKEND_EXIT_TIMEOUT."""
        if self.sock is None:
            return
        deadline = monotonic() + BACKEND_EXIT_TIMEOUT
        try:
            while (left := deadline - monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(_RECV_BYTES):
                    return
        except OSError:  # timed out, or reset: nothing more to wait for
            return

    async def await_exit_async(self) -> None:
        """``await_exit`` on an event loop, which keeps running meanwhile."""
        if self.sock is None:
            return
        self.sock.setblocking(False)
        loop = asyncio.get_running_loop()
        deadline = monotonic() + BACKEND_EXIT_TIMEOUT
        try:
            while (left := deadline - monotonic()) > 0:
                if not await bounded(loop.sock_recv(self.sock, _RECV_BYTES), left):
                    return  # the server's end closed, or the wait ran out
        except OSError:
            return

    def release(self) -> None:
        if self.sock is not None:
            self.sock.close()


def _duplicate(fileno: Callable[[], int]) -> socket.socket | None:
    try:
        return socket.socket(fileno=os.dup(fileno()))
    except Exception:
        return None


class BackendExits:
    """Reports each counted connection's close once the server has let its backend go.

    Each connection's socket is duplicated when it opens. The server closes its end of
    the socket only once the backend process has exited, so end-of-file on the duplicate
    says the slot is free again. When a close is seen (a close hook, the driver's closed
    flag at a sweep, the garbage collector), the duplicate is hung up and the close is
    reported at its end-of-file, or after BACKEND_EXIT_TIMEOUT at most: until then the
    connection stays counted, so no other worker is granted a slot the server still
    holds. A synchronous close waits for that inline, an asyncio one awaits it; the
    others (asyncpg's closes, which must not block their loop, a psycopg2 connection
    closed without a hook, a collected connection) are watched by one thread.
    """

    def __init__(
        self, report: Callable[[int, int], None], on_error: Callable[[BaseException], None]
    ) -> None:
        self._report = report
        self._on_error = on_error
        self._open: dict[int, _Watch] = {}
        # Handed to the thread; finalizers only append (any lock may be held then).
        self._handed: collections.deque[_Watch] = collections.deque()
        self._pending = 0  # handed over and not reported yet
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._wake_w: int | None = None
        self._wake_r: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- what the hooks call --------------------------------------------------------------

    def track(
        self, conn: Any, pid: int, fileno: Callable[[], int], is_closed: Callable[[Any], bool]
    ) -> None:
        """Start watching a connection that just opened."""
        watch = _Watch(conn, pid, _duplicate(fileno), is_closed)
        with self._lock:
            self._start_thread()
            stale = self._open.get(watch.key)
            if stale is not None and stale.ref() is None:
                # Its connection was collected and the id reused: its finalizer has
                # handed it over already, and the thread will report it.
                pass
            elif stale is not None:
                self._take(stale)
                stale.release()
            self._open[watch.key] = watch
            watch.finalizer = weakref.finalize(conn, self._collected, watch)
            watch.finalizer.atexit = False

    def closed(self, conn: Any) -> None:
        """The client closed ``conn`` (never blocks): reported now if its backend is gone
        already, else by the thread once it is."""
        watch = self._take_conn(conn)
        if watch is None:
            return
        watch.hang_up()
        if watch.exited_now():
            self._finish(watch)
        else:
            self._hand_over(watch)

    def closed_sync(self, conn: Any) -> None:
        """The client closed ``conn``: return once its backend has exited (bounded)."""
        watch = self._take_conn(conn)
        if watch is not None:
            watch.hang_up()
            watch.await_exit()
            self._finish(watch)

    async def closed_async(self, conn: Any) -> None:
        """``closed_sync`` on an event loop, awaiting."""
        watch = self._take_conn(conn)
        if watch is not None:
            watch.hang_up()
            await watch.await_exit_async()
            self._finish(watch)

    def sweep(self, wait: bool) -> None:
        """Hand over the connections their driver now says are closed (psycopg2 has no
        close hook; a broken psycopg connection closes without one); ``wait``: return
        once every close handed over is reported (bounded)."""
        with self._lock:
            watches = list(self._open.values())
        for watch in watches:
            conn = watch.ref()
            if conn is None:
                continue  # its finalizer hands it over
            try:
                gone = watch.is_closed(conn)
            except Exception:
                gone = True
            del conn
            if gone and self._take_if_open(watch):
                watch.hang_up()
                self._hand_over(watch)
        if wait:
            self.settle()

    def settle(self) -> None:
        """Wait until every close handed over is reported, at most BACKEND_EXIT_TIMEOUT
        after the last one."""
        deadline = monotonic() + BACKEND_EXIT_TIMEOUT
        with self._lock:
            while self._pending or self._handed:
                left = deadline - monotonic()
                if left <= 0 or self._thread is None:
                    return
                self._settled.wait(left)

    async def settle_async(self) -> None:
        """``settle`` without blocking the event loop."""
        with self._lock:
            if not (self._pending or self._handed):
                return
        await asyncio.get_running_loop().run_in_executor(None, self.settle)

    def stop(self) -> None:
        """Stop the thread and drop every duplicate (the hooks are being removed)."""
        with self._lock:
            self._stopping = True
            thread, self._thread = self._thread, None
            for watch in self._open.values():
                if watch.finalizer is not None:
                    watch.finalizer.detach()
                watch.release()  # the driver's own descriptor keeps the connection
            self._open.clear()
        if thread is not None:
            self._wake()
            thread.join(_WATCHER_STOP_TIMEOUT)
        while self._handed:
            self._handed.popleft().release()
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = None

    # -- ownership of a watch: exactly one party reports it -------------------------------

    def _take(self, watch: _Watch) -> None:
        """Take ``watch`` out of the open ones (lock held)."""
        del self._open[watch.key]
        if watch.finalizer is not None:
            watch.finalizer.detach()

    def _take_if_open(self, watch: _Watch) -> bool:
        with self._lock:
            if self._open.get(watch.key) is not watch:
                return False
            self._take(watch)
            return True

    def _take_conn(self, conn: Any) -> _Watch | None:
        with self._lock:
            watch = self._open.get(id(conn))
            if watch is None or watch.ref() is not conn:
                return None
            self._take(watch)
            return watch

    def _finish(self, watch: _Watch) -> None:
        watch.release()
        try:
            self._report(watch.pid, watch.key)
        except Exception as exc:
            self._on_error(exc)

    def _collected(self, watch: _Watch) -> None:
        """A tracked connection was garbage-collected (runs inside any allocation, any
        lock held: only queue it and wake the thread)."""
        self._handed.append(watch)
        self._wake()

    def _hand_over(self, watch: _Watch) -> None:
        self._handed.append(watch)
        self._wake()

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")

    # -- the thread ----------------------------------------------------------------------

    def _start_thread(self) -> None:
        """Start the watching thread (lock held) on the first connection."""
        if self._thread is not None or self._stopping:
            return
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(
            target=self._run, args=(self._wake_r,), name="poolaware-backend-exits", daemon=True
        )
        self._thread.start()

    def _run(self, wake: int) -> None:
        poller = select.poll()
        poller.register(wake, select.POLLIN)
        watching: dict[int, _Watch] = {}
        while not self._stopping:
            try:
                self._watch_handed(poller, watching)
                now = monotonic()
                for fd, watch in list(watching.items()):
                    if watch.deadline <= now or watch.exited_now():
                        self._done(poller, watching, fd)
                timeout = min((w.deadline for w in watching.values()), default=None)
                wait_ms = None if timeout is None else max(0, int((timeout - now) * 1000) + 1)
                for fd, _ in poller.poll(wait_ms):
                    if fd == wake:
                        with contextlib.suppress(OSError):
                            os.read(wake, _RECV_BYTES)
            except Exception as exc:  # never let the thread die with closes pending
                self._on_error(exc)
        for watch in watching.values():
            watch.release()

    def _watch_handed(self, poller: select.poll, watching: dict[int, _Watch]) -> None:
        while True:
            with self._lock:
                if not self._handed:
                    return
                watch = self._handed.popleft()
                self._pending += 1
                if self._open.get(watch.key) is watch:  # collected: not taken yet
                    del self._open[watch.key]
            watch.hang_up()
            if watch.sock is None:
                self._finish(watch)
                self._reported()
                continue
            watch.deadline = monotonic() + BACKEND_EXIT_TIMEOUT
            fd = watch.sock.fileno()
            watching[fd] = watch
            poller.register(fd, select.POLLIN)

    def _done(self, poller: select.poll, watching: dict[int, _Watch], fd: int) -> None:
        watch = watching.pop(fd)
        poller.unregister(fd)
        self._finish(watch)
        self._reported()

    def _reported(self) -> None:
        with self._lock:
            self._pending -= 1
            self._settled.notify_all()


# -- psycopg 3 ----------------------------------------------------------------------------------


def _psycopg_closed(conn: Any) -> bool:
    return bool(conn.closed)


def _install_psycopg(
    sink: ConnectionSink, exits: BackendExits, undo: list[Callable[[], None]]
) -> None:
    import psycopg

    base = _definer(psycopg.Connection, "_connect_gen")
    connect_gen = base.__dict__["_connect_gen"].__func__

    def _connect_gen(cls: Any, *args: Any, **kwargs: Any) -> Any:
        conn = yield from connect_gen(cls, *args, **kwargs)
        pid = conn.info.backend_pid
        exits.track(conn, pid, conn.fileno, _psycopg_closed)
        sink.opened(conn, pid, "psycopg", _opening_pool())
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
        try:
            sync_close(self)
        finally:
            if self.closed:
                exits.closed_sync(self)

    _patch(psycopg.Connection, "close", close, undo)

    async_close = psycopg.AsyncConnection.__dict__["close"]

    @functools.wraps(async_close)
    async def close_async(self: Any) -> None:
        try:
            await async_close(self)
        finally:
            if self.closed:
                await exits.closed_async(self)

    _patch(psycopg.AsyncConnection, "close", close_async, undo)


# -- psycopg_pool -------------------------------------------------------------------------------


def _install_psycopg_pool(
    sink: ConnectionSink, exits: BackendExits, undo: list[Callable[[], None]]
) -> None:
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


def _asyncpg_socket(conn: Any) -> Callable[[], int]:
    return lambda: int(conn._transport.get_extra_info("socket").fileno())


def _install_asyncpg(
    sink: ConnectionSink, exits: BackendExits, undo: list[Callable[[], None]]
) -> None:
    from asyncpg import connect_utils
    from asyncpg.connection import Connection
    from asyncpg.pool import Pool, PoolConnectionHolder

    connect = connect_utils._connect

    @functools.wraps(connect)
    async def _connect(*args: Any, **kwargs: Any) -> Any:
        pool = _opening_pool()
        await sink.gate_async(_background())
        conn = await connect(*args, **kwargs)
        pid = conn.get_server_pid()
        exits.track(conn, pid, _asyncpg_socket(conn), _asyncpg_closed)
        sink.opened(conn, pid, "asyncpg", pool)
        return conn

    _patch(connect_utils, "_connect", _connect, undo)

    cleanup = Connection.__dict__["_cleanup"]

    @functools.wraps(cleanup)
    def _cleanup(self: Any) -> None:
        # Closed, terminated or dropped by the server: reported once the backend has
        # exited, by the exit watcher if not at once (never blocking this loop).
        exits.closed(self)
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


def _install_psycopg2(
    sink: ConnectionSink, exits: BackendExits, undo: list[Callable[[], None]]
) -> None:
    import psycopg2

    connect = psycopg2._connect

    def _connect(*args: Any, **kwargs: Any) -> Any:
        sink.gate(False)
        conn = connect(*args, **kwargs)
        if not conn.async_:  # an asynchronous connection has no backend until polled
            pid = conn.get_backend_pid()
            exits.track(conn, pid, conn.fileno, _psycopg2_closed)
            sink.opened(conn, pid, "psycopg2", None)
        return conn

    _patch(psycopg2, "_connect", _connect, undo)


_Installer = Callable[[ConnectionSink, BackendExits, list[Callable[[], None]]], None]
_INSTALLERS: Final[dict[str, _Installer]] = {
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
        self._exits = BackendExits(sink.closed, on_error)
        self._lock = threading.RLock()

    @property
    def hooked(self) -> frozenset[str]:
        return frozenset(self._hooked)

    def install(self) -> None:
        """Hook the drivers already imported, and the others when they are imported."""
        with self._lock:
            if self._watcher is None:
                self._exits = BackendExits(self._sink.closed, self._on_error)
                self._watcher = _ImportWatcher(frozenset(DRIVER_MODULES), self._loaded)
                sys.meta_path.insert(0, self._watcher)
            for name in DRIVER_MODULES:
                if sys.modules.get(name) is not None:  # None: its import is barred
                    self._loaded(name)

    def _loaded(self, name: str) -> None:
        with self._lock:
            if name in self._hooked or self._watcher is None:
                return
            self._hooked.add(name)
            undo: list[Callable[[], None]] = []
            try:
                _INSTALLERS[name](self._sink, self._exits, undo)
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
            self._exits.stop()

    def sweep(self, wait: bool) -> None:
        """Notice closes no hook reported (``BackendExits.sweep``)."""
        self._exits.sweep(wait)

    async def settle_async(self) -> None:
        """Wait, awaiting, until the closes noticed so far are reported (bounded)."""
        await self._exits.settle_async()

    def close_awaiting_exit(self, conn: Any) -> None:
        """Close a connection whose driver has no close hook (psycopg2's), returning
        once its backend has exited and the close is reported."""
        conn.close()
        self._exits.closed_sync(conn)

    def sees(self, sqlalchemy_driver: str) -> bool:
        """Whether connections of this SQLAlchemy dialect driver are counted here."""
        return SQLALCHEMY_DRIVERS.get(sqlalchemy_driver) in self._hooked
