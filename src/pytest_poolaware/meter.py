"""Worker-side instrumentation: every SQLAlchemy pool in the process, counted live.

Listeners sit on the ``Pool`` class (and the dialect's ``do_connect``), so pools that user
code creates, sync or asyncio, are measured with no change to that code. Connections
opened outside SQLAlchemy pools are not seen.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class BudgetRefused(Exception):
    """Raised into a test's connect call to break a deadlock; the test is rerun alone.

    Carries PostgreSQL's "too many connections" SQLSTATE so code that handles the
    server's own refusal handles this one too.
    """

    sqlstate = "53300"


class RoomTooSmall(Exception):
    """Raised into a test's connect call when the test needs more connections at once
    than the server allows the run's login: connecting would be refused for certain,
    and so would a rerun (so no SQLSTATE: it is not a rerun's cue)."""


@dataclass(frozen=True)
class Window:
    """What one test did to the worker's connections."""

    need: int  # peak connections checked out at once
    peak_open: int  # peak connections open (idle ones included)
    limit_hit: bool


class PoolMeter:
    """Counts open and checked-out connections of this process; gates new connections.

    ``on_change(open, idle, released, version)`` is called whenever the open count changes;
    ``version`` grows with every change (checkouts and checkins included), so the controller
    can tell a stale snapshot that arrived late from a newer one. ``gate()`` is called
    before every new connection and may block until the budget has room.
    Errors inside listeners are contained: they are handed to ``on_error`` once and
    never reach the test.
    """

    _EVENTS = ("connect", "close", "close_detached", "checkout", "checkin")

    def __init__(
        self,
        on_change: Callable[[int, int, bool, int], None],
        gate: Callable[[], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        self.open = 0
        self.checked_out = 0
        self.version = 0
        self._peak_checked_out = 0
        self._peak_open = 0
        self._on_change = on_change
        self._gate = gate
        self._on_error = on_error
        self._error_seen = False
        self._pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self._loops: weakref.WeakKeyDictionary[Any, asyncio.AbstractEventLoop] = (
            weakref.WeakKeyDictionary()
        )
        self._installed = False
        # Pool events fire on whichever thread uses the pool.
        self._lock = threading.Lock()

    @property
    def idle(self) -> int:
        return max(0, self.open - self.checked_out)

    # -- listeners ------------------------------------------------------------------------

    @property
    def installed(self) -> bool:
        return self._installed

    def install(self) -> None:
        """Listen on every pool. Imports SQLAlchemy: call it once the process uses it (a
        worker that never does should not pay for the import)."""
        from sqlalchemy import event
        from sqlalchemy.engine import Engine
        from sqlalchemy.pool import Pool

        for name in self._EVENTS:
            event.listen(Pool, name, getattr(self, f"_on_{name}"))
        event.listen(Engine, "do_connect", self._on_do_connect)
        event.listen(Engine, "engine_connect", self._on_engine_connect)
        self._installed = True

    def uninstall(self) -> None:
        if not self._installed:
            return
        from sqlalchemy import event
        from sqlalchemy.engine import Engine
        from sqlalchemy.pool import Pool

        for name in self._EVENTS:
            event.remove(Pool, name, getattr(self, f"_on_{name}"))
        event.remove(Engine, "do_connect", self._on_do_connect)
        event.remove(Engine, "engine_connect", self._on_engine_connect)
        self._installed = False

    def _contain(self, exc: BaseException) -> None:
        if not self._error_seen:
            self._error_seen = True
            self._on_error(exc)

    def _on_do_connect(self, dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> None:
        try:
            self._gate()
        except (BudgetRefused, RoomTooSmall):
            raise
        except Exception as exc:
            self._contain(exc)

    def _on_engine_connect(self, connection: Any) -> None:
        """Remember each engine's pool (and asyncio loop) so idle connections can be released."""
        try:
            pool = connection.engine.pool
            if pool not in self._pools:
                self._pools.add(pool)
                loop = _running_loop()
                if loop is not None:
                    self._loops[pool] = loop
        except Exception as exc:
            self._contain(exc)

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        self._changed(+1)

    def _on_close(self, dbapi_connection: Any, record: Any) -> None:
        self._changed(-1)

    def _on_close_detached(self, dbapi_connection: Any) -> None:
        self._changed(-1)

    def _on_checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        with self._lock:
            self.version += 1
            self.checked_out += 1
            self._peak_checked_out = max(self._peak_checked_out, self.checked_out)

    def _on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        with self._lock:
            self.version += 1
            self.checked_out = max(0, self.checked_out - 1)

    def _changed(self, delta: int) -> None:
        with self._lock:
            self.version += 1
            self.open = max(0, self.open + delta)
            self._peak_open = max(self._peak_open, self.open)
            self._report(released=False)

    def report(self, *, released: bool) -> None:
        """Send the current counts (``released``: in answer to a release request)."""
        with self._lock:
            self.version += 1  # a new message, even if nothing changed
            self._report(released=released)

    def _report(self, *, released: bool) -> None:
        # Called with the lock held, so that counts leave in the order they changed:
        # a stale lower count arriving last would let the controller over-grant.
        try:
            self._on_change(self.open, self.idle, released, self.version)
        except Exception as exc:
            self._contain(exc)

    def snapshot(self) -> tuple[int, int, int]:
        """(open, idle, version), taken together."""
        with self._lock:
            return self.open, self.idle, self.version

    # -- per-test windows -------------------------------------------------------------------

    def begin(self) -> None:
        """Start measuring one test: peaks restart from what is held now."""
        self._peak_checked_out = self.checked_out
        self._peak_open = self.open

    def end(self, limit_hit: bool = False) -> Window:
        return Window(self._peak_checked_out, self._peak_open, limit_hit)

    # -- giving connections back ------------------------------------------------------------

    def release_idle(self) -> None:
        """Close idle pooled connections so another worker can have the room.

        A pool with connections checked out is left alone (disposing it would disturb its
        overflow accounting); an asyncio pool is disposed on its own event loop when that
        loop is idle, since asyncpg connections can only be closed there.
        """
        if not self._installed:
            return
        from sqlalchemy.pool import QueuePool

        try:
            for pool in list(self._pools):
                if not isinstance(pool, QueuePool):
                    continue  # nothing idle to give back (NullPool), or not ours to judge
                if pool.checkedout() > 0 or pool.checkedin() == 0:
                    continue
                loop = self._loops.get(pool)
                if loop is None:
                    pool.dispose()
                elif not loop.is_closed() and not loop.is_running():
                    from sqlalchemy.util import greenlet_spawn

                    loop.run_until_complete(greenlet_spawn(pool.dispose))
        except Exception as exc:
            self._contain(exc)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
