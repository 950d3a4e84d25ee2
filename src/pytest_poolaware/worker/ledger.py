"""Worker side: the ledger of every PostgreSQL connection of the process, from open until
closed, by backend pid.

Fed by the driver hooks (``drivers``: what opened, closed, was lent out) and by
SQLAlchemy's pool events (which of a pool's connections are checked out, and the
connections of a dialect whose driver is not hooked). The meter (``meter.PoolMeter``)
builds on it: the gate, per-test windows, giving idle connections back.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Final

from pytest_poolaware.shared.clock import wall
from pytest_poolaware.worker.drivers import DriverHooks, running_loop
from pytest_poolaware.worker.reclaim import IdlePool

#: Item index meaning "no test is being called".
NO_ITEM: Final = -1


@dataclass(eq=False)
class _Counted:
    """One open connection the driver hooks reported."""

    pid: int
    key: int  # id() of the driver's connection
    driver: str
    ref: Callable[[], Any]  # a weak reference to the driver's connection
    pool: Any  # the psycopg_pool / asyncpg pool that owns it, if any
    loop: asyncio.AbstractEventLoop | None  # where it was opened (asyncio drivers)
    pooled: bool
    in_use: bool
    opened_at: float  # time.time(), to compare with the server's samples
    opened_by: int = NO_ITEM
    lent_by: int = NO_ITEM
    #: Held by Django for the test thread: idle between tests when Django is done with
    #: it (``django_conns``), in use while a test runs.
    django: bool = False


class ConnectionLedger:
    """Every PostgreSQL connection of the process, counted from open until closed: what
    is open and checked out, by which driver and test, and what the server ended.

    Fed by the driver hooks (``opened``, ``closed``, ``lent``) and SQLAlchemy's pool
    events (``SqlAlchemyLedger``), on whichever thread uses a connection.
    ``on_change(open, idle, released, version)`` is called whenever the open count
    changes; ``version`` grows with every change (checkouts and checkins included), so the
    controller can tell a stale snapshot that arrived late from a newer one. Errors
    inside the instrumentation are contained: they are handed to ``on_error`` once and
    never reach the test.
    """

    #: The driver hooks that feed this ledger, and report closes once backends exit
    #: (made by the subclass, which is the hooks' full ``ConnectionSink``).
    hooks: DriverHooks

    def __init__(
        self,
        on_change: Callable[[int, int, bool, int], None],
        on_error: Callable[[BaseException], None],
        on_opened: Callable[[Any, str], None] | None = None,
    ) -> None:
        self.version = 0
        #: Called with each newly counted connection and its driver (outside the lock).
        self._on_opened = on_opened
        self._on_change = on_change
        self._on_error = on_error
        self._error_seen = False
        #: The first failure contained, kept until someone hears of it (``bind``).
        self._first_error: BaseException | None = None
        # Counted by the driver hooks, by backend pid and by connection object.
        self._by_pid: dict[int, _Counted] = {}
        self._by_conn: dict[int, _Counted] = {}
        self._in_use = 0
        # Connections of SQLAlchemy dialects whose driver is not hooked.
        self._sa_only: set[int] = set()
        self._sa_checked_out: set[int] = set()
        self._peak_checked_out = 0
        self._peak_open = 0
        self._item = NO_ITEM
        self._in_call = False
        self._window_drivers: set[str] = set()
        # Hooks fire on whichever thread uses a connection; reentrant for safety.
        self._lock = threading.RLock()

    # -- counts -------------------------------------------------------------------------------

    @property
    def open(self) -> int:
        return len(self._by_pid) + len(self._sa_only)

    @property
    def checked_out(self) -> int:
        return self._in_use + len(self._sa_checked_out)

    @property
    def idle(self) -> int:
        return max(0, self.open - self.checked_out)

    def _contain(self, exc: BaseException) -> None:
        if not self._error_seen:
            self._error_seen = True
            self._first_error = exc
            self._on_error(exc)

    def _rebind(
        self,
        on_change: Callable[[int, int, bool, int], None],
        on_error: Callable[[BaseException], None],
        on_opened: Callable[[Any, str], None] | None = None,
    ) -> list[tuple[Any, str]]:
        """Report to these from now on; returns the connections still open, with their
        drivers, for ``on_opened`` to hear of those counted before (see
        ``PoolMeter.unbound``). A failure contained before is handed to ``on_error``."""
        with self._lock:
            self._on_change, self._on_error, self._on_opened = on_change, on_error, on_opened
            early_error, self._first_error = self._first_error, None
            alive = [(r.ref(), r.driver) for r in self._by_pid.values()]
        if early_error is not None:
            on_error(early_error)
        return [(conn, driver) for conn, driver in alive if conn is not None]

    # -- what the driver hooks report (drivers.ConnectionSink) --------------------------------

    def opened(self, conn: Any, pid: int, driver: str, pool: Any) -> None:
        try:
            with self._lock:
                for stale in (self._by_pid.get(pid), self._by_conn.get(id(conn))):
                    # The same backend or object seen twice: one count (a pid comes back
                    # only once its backend has exited).
                    if stale is not None:
                        self._forget(stale)
                record = _Counted(
                    pid=pid,
                    key=id(conn),
                    driver=driver,
                    ref=weakref.ref(conn),
                    pool=pool,
                    loop=running_loop(),
                    pooled=pool is not None,
                    in_use=pool is None,
                    opened_at=wall(),
                    opened_by=self._item if self._in_call else NO_ITEM,
                )
                self._by_pid[pid] = record
                self._by_conn[id(conn)] = record
                if record.in_use:
                    self._in_use += 1
                    self._window_drivers.add(driver)
                self._changed()
            if self._on_opened is not None:
                self._on_opened(conn, driver)
        except Exception as exc:
            self._contain(exc)

    def closed(self, pid: int, key: int) -> None:
        """Reported by the hooks once the backend of a closed (or garbage-collected)
        connection has exited: counted until then, as the server counts it."""
        try:
            with self._lock:
                record = self._by_pid.get(pid)
                if record is not None and record.key == key:
                    self._forget(record)
                    self._changed()
        except Exception as exc:
            self._contain(exc)

    def lent(self, conn: Any, in_use: bool) -> None:
        try:
            with self._lock:
                record = self._by_conn.get(id(conn))
                if record is None:
                    return
                record.pooled = True
                self._lend(record, in_use)
        except Exception as exc:
            self._contain(exc)

    def _lend(self, record: _Counted, in_use: bool) -> None:
        self.version += 1
        if record.in_use == in_use:
            return
        record.in_use = in_use
        if in_use:
            self._in_use += 1
            record.lent_by = self._item if self._in_call else NO_ITEM
            self._window_drivers.add(record.driver)
            self._peak_checked_out = max(self._peak_checked_out, self.checked_out)
        else:
            self._in_use -= 1
            record.lent_by = NO_ITEM

    def _forget(self, record: _Counted) -> None:
        """Uncount one connection (lock held)."""
        if self._by_pid.get(record.pid) is record:
            del self._by_pid[record.pid]
        if self._by_conn.get(record.key) is record:
            del self._by_conn[record.key]
        if record.in_use:
            self._in_use -= 1
            record.in_use = False

    def _changed(self) -> None:
        """The open count moved (lock held): new peaks, and tell the controller."""
        self.version += 1
        self._peak_open = max(self._peak_open, self.open)
        self._peak_checked_out = max(self._peak_checked_out, self.checked_out)
        self._report(released=False)

    # -- noticing closes the driver did not announce --------------------------------------------

    def sweep(self) -> None:
        """Uncount the connections their driver now says are closed (psycopg2 has no close
        hook; a broken psycopg connection is closed without one) or that were collected,
        returning once their backends have exited (bounded: ``drivers.BackendExits``)."""
        try:
            self.hooks.sweep(wait=True)
        except Exception as exc:
            self._contain(exc)

    async def _sweep_async(self) -> None:
        """``sweep`` from a coroutine: the closes reported, without blocking the loop."""
        self.hooks.sweep(wait=False)
        await self.hooks.settle_async()

    def pids(self) -> list[int]:
        """Backend pids of the connections counted now (to check against the server)."""
        self.sweep()
        with self._lock:
            return sorted(self._by_pid)

    def reconcile(self, alive: Collection[int], before: float | None = None) -> int:
        """Uncount the connections whose backend is not in ``alive`` (pids the server's
        ``pg_stat_activity`` listed at time ``before``; connections opened since are
        kept): the server ended them, and the driver would notice only on next use.
        Returns how many were uncounted."""
        alive = set(alive)
        with self._lock:
            gone = [
                r
                for pid, r in self._by_pid.items()
                if pid not in alive and (before is None or r.opened_at < before)
            ]
            for record in gone:
                self._forget(record)
            if gone:
                self._changed()
        return len(gone)

    def drivers_open(self) -> dict[str, int]:
        """Open connections per driver (SQLAlchemy-only ones under ``sqlalchemy``)."""
        with self._lock:
            counts = collections.Counter(r.driver for r in self._by_pid.values())
            if self._sa_only:
                counts["sqlalchemy"] += len(self._sa_only)
            return dict(counts)

    # -- what the meter reads ------------------------------------------------------------------

    def _report(self, *, released: bool) -> None:
        # Called with the lock held, so that counts leave in the order they changed:
        # a stale lower count arriving last would let the controller over-grant.
        try:
            self._on_change(self.open, self.idle, released, self.version)
        except Exception as exc:
            self._contain(exc)

    def _idle_driver_pools(self) -> list[IdlePool]:
        """Driver pools (psycopg_pool, asyncpg's) holding idle connections, with their
        loop and driver."""
        with self._lock:
            pools: dict[int, IdlePool] = {}
            for record in self._by_pid.values():
                driver = self.hooks.driver(record.driver)
                if record.pool is not None and not record.in_use and driver is not None:
                    pools.setdefault(id(record.pool), (record.pool, record.loop, driver))
            return list(pools.values())


class SqlAlchemyLedger(ConnectionLedger):
    """The ledger fed by SQLAlchemy's pool events too (installed by ``sqlalchemy_events``):
    they mark a connection the driver hooks counted as pooled, lent or returned, and
    count on their own the connections of a dialect whose driver is not hooked."""

    def _counted(self, dbapi_connection: Any) -> _Counted | None:
        driver_connection = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        return self._by_conn.get(id(driver_connection))

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        with self._lock:
            counted = self._counted(dbapi_connection)
            if counted is not None:
                counted.pooled = True  # SQLAlchemy's checkout follows
                self._lend(counted, False)
                return
            self._sa_only.add(id(dbapi_connection))
            self._changed()

    def _on_close(self, dbapi_connection: Any, record: Any) -> None:
        self._on_close_detached(dbapi_connection)

    def _on_close_detached(self, dbapi_connection: Any) -> None:
        with self._lock:
            counted = self._counted(dbapi_connection)
        if counted is not None:
            # About to be closed. Counted until its backend has exited, or another
            # worker could be granted the slot the server still holds: the driver hooks
            # report then. A connection whose driver has no close hook is closed here,
            # so that this returns once it is reported (``DriverHooks.closing``).
            conn = counted.ref()
            if conn is not None:
                try:
                    self.hooks.closing(conn, counted.driver)
                except Exception as exc:
                    self._contain(exc)
            return
        with self._lock:
            if id(dbapi_connection) in self._sa_only:
                self._sa_only.discard(id(dbapi_connection))
                self._sa_checked_out.discard(id(dbapi_connection))
                self._changed()

    def _on_checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        self._sa_lend(dbapi_connection, True)

    def _on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:
            self._sa_lend(dbapi_connection, False)

    def _sa_lend(self, dbapi_connection: Any, in_use: bool) -> None:
        with self._lock:
            counted = self._counted(dbapi_connection)
            if counted is not None:
                self._lend(counted, in_use)
                return
            self.version += 1
            key = id(dbapi_connection)
            if key not in self._sa_only:
                return
            if in_use:
                self._sa_checked_out.add(key)
                self._window_drivers.add("sqlalchemy")
                self._peak_checked_out = max(self._peak_checked_out, self.checked_out)
            else:
                self._sa_checked_out.discard(key)
