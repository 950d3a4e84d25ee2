"""Worker-side instrumentation: every PostgreSQL connection of the process, counted live.

Connections are counted where the drivers make them (``drivers``: psycopg 3, psycopg2,
asyncpg, pg8000, and through them psycopg_pool, asyncpg pools, SQLAlchemy and Django),
from open until closed, and identified by the server's backend pid (``ledger``). Pools
say which of their connections are lent out: SQLAlchemy through class-level pool
listeners, psycopg_pool and asyncpg pools through the driver hooks. A connection no pool
has is in use while open. SQLAlchemy connections of a driver that is not hooked are
counted by SQLAlchemy's listeners alone, as before. The meter gates new connections,
measures each test and gives idle connections back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pytest_poolaware.worker.django_conns import DjangoConnections
from pytest_poolaware.worker.drivers import DriverHooks
from pytest_poolaware.worker.ledger import NO_ITEM, SqlAlchemyLedger
from pytest_poolaware.worker.reclaim import Reclaimer
from pytest_poolaware.worker.sqlalchemy_events import POOL_EVENTS, SqlAlchemyListeners

__all__ = [
    "NO_ITEM",
    "BudgetRefused",
    "ControllerGone",
    "GateRefusal",
    "PoolMeter",
    "RoomTooSmall",
    "Window",
]


class GateRefusal(Exception):
    """The connect gate's own refusals: they reach the test's connect call (any other
    failure of the instrumentation is contained, and the connection proceeds)."""


class BudgetRefused(GateRefusal):
    """Raised into a test's connect call to break a deadlock; the test is rerun alone.

    Carries PostgreSQL's "too many connections" SQLSTATE so code that handles the
    server's own refusal handles this one too.
    """

    sqlstate = "53300"


class RoomTooSmall(GateRefusal):
    """Raised into a test's connect call when the test needs more connections at once
    than the server allows the run's login: connecting would be refused for certain,
    and so would a rerun (so no SQLSTATE: it is not a rerun's cue)."""


class ControllerGone(GateRefusal):
    """Raised into a connect call once the run's controller has gone (killed, or its
    connection lost): nothing holds this worker's connections within a budget any more,
    and another run may already be taking the room the dead run leased, so the worker
    opens no new connection (no SQLSTATE: there is nobody left to rerun it for)."""


@dataclass(frozen=True)
class Window:
    """What one test did to the worker's connections."""

    need: int  # peak connections checked out at once
    peak_open: int  # peak connections open (idle ones included)
    limit_hit: bool = False
    drivers: tuple[str, ...] = ()  # drivers of the connections it used
    leaks: int = 0  # connections it opened or checked out in its call, still held at its end


Gate = Callable[[bool], None]
AsyncGate = Callable[[bool], Awaitable[None]]


class PoolMeter(SqlAlchemyLedger):
    """Counts open and checked-out connections of this process (``ledger``);
    gates new connections, measures each test, gives idle connections back.

    ``gate(background)`` is called before every new connection and may block until the
    budget has room (``gate_async`` on an event loop); ``background`` marks a pool's own
    growth, which is delayed but never refused.
    """

    def __init__(
        self,
        on_change: Callable[[int, int, bool, int], None],
        gate: Gate,
        on_error: Callable[[BaseException], None],
        gate_async: AsyncGate | None = None,
        on_opened: Callable[[Any, str], None] | None = None,
    ) -> None:
        super().__init__(on_change, on_error, on_opened)
        self._gate = gate
        self._gate_async = gate_async
        #: The drivers of the connections opened before ``bind`` (``unbound``).
        self.opened_unbound: list[str] = []
        self.hooks = DriverHooks(self, self._contain)
        self._sqlalchemy = SqlAlchemyListeners(
            {name: getattr(self, f"_on_{name}") for name in POOL_EVENTS},
            gate=self.gate,
            sees=self.hooks.sees,
            contain=self._contain,
        )
        self._django = DjangoConnections()
        self._reclaimer = Reclaimer(
            self._sqlalchemy,
            close_django=self._close_idle_django,
            idle_driver_pools=self._idle_driver_pools,
            contain=self._contain,
            sweep=self.sweep,
            sweep_async=self._sweep_async,
        )

    @classmethod
    def unbound(cls) -> PoolMeter:
        """A meter for a worker's start-up, before its side channel exists (conftests are
        imported before ``config.workerinput`` is set): it counts every connection and
        gates none, until ``bind`` hands it to the worker's agent."""
        opened: list[str] = []
        meter = cls(
            on_change=_ignore_counts,
            gate=_no_gate,
            on_error=_ignore_error,
            on_opened=lambda conn, driver: opened.append(driver),
        )
        meter.opened_unbound = opened
        return meter

    def bind(
        self,
        *,
        on_change: Callable[[int, int, bool, int], None],
        gate: Gate,
        on_error: Callable[[BaseException], None],
        gate_async: AsyncGate | None = None,
        on_opened: Callable[[Any, str], None] | None = None,
    ) -> list[tuple[Any, str]]:
        """The worker's agent takes over: counts go to the controller and connects wait
        at its gate from now on. Returns the connections still open; the
        drivers of every connection opened before, closed ones included, stay in
        ``opened_unbound``."""
        self._gate, self._gate_async = gate, gate_async
        return self._rebind(on_change, on_error, on_opened)

    # -- installing ---------------------------------------------------------------------------

    @property
    def installed(self) -> bool:
        return self._sqlalchemy.installed

    def install(self) -> None:
        """Hook the drivers (now, or when imported) and, once SQLAlchemy is in use, its
        pools (``sqlalchemy_events``)."""
        self.hooks.install()
        self._sqlalchemy.install()

    def uninstall(self) -> None:
        self.hooks.uninstall()
        self._sqlalchemy.uninstall()

    # -- gating new connections ----------------------------------------------------------------

    def gate(self, background: bool) -> None:
        try:
            self.hooks.sweep(wait=True)
            self._gate(background)
        except GateRefusal:
            raise
        except Exception as exc:
            self._contain(exc)

    async def gate_async(self, background: bool) -> None:
        try:
            self.hooks.sweep(wait=False)  # never block the loop: closes report on their own
            if self._gate_async is None:
                self._gate(background)
            else:
                await self._gate_async(background)
        except GateRefusal:
            raise
        except Exception as exc:
            self._contain(exc)

    # -- reporting ------------------------------------------------------------------------------

    def report(self, *, released: bool) -> None:
        """Send the current counts (``released``: in answer to a release request)."""
        with self._lock:
            self.version += 1  # a new message, even if nothing changed
            self._report(released=released)

    def snapshot(self) -> tuple[int, int, int]:
        """(open, idle, version), taken together."""
        with self._lock:
            return self.open, self.idle, self.version

    # -- per-test windows -------------------------------------------------------------------

    def begin(self, item: int = NO_ITEM) -> None:
        """Start measuring one test: peaks restart from what is held now (Django's
        connections of the test thread count as in use while it runs)."""
        self.sweep()
        with self._lock:
            for record in self._by_pid.values():
                if record.django and not record.in_use:
                    self._lend(record, True)
            self._item = item
            self._peak_checked_out = self.checked_out
            self._peak_open = self.open
            self._window_drivers = {r.driver for r in self._by_pid.values() if r.in_use}
            if self._sa_checked_out:
                self._window_drivers.add("sqlalchemy")

    def call_started(self) -> None:
        """The test's own code runs: what it opens from now on and keeps is a leak."""
        self._in_call = True

    def call_ended(self) -> None:
        self._in_call = False

    def end(self, limit_hit: bool = False) -> Window:
        self.sweep()
        self.idle_django()  # what Django keeps but no longer uses is no leak
        with self._lock:
            item = self._item
            leaks = 0
            if item != NO_ITEM:
                leaks = sum(
                    (r.opened_by == item and (r.in_use or not r.pooled))
                    or (r.in_use and r.lent_by == item)
                    for r in self._by_pid.values()
                )
            self._in_call = False
            return Window(
                self._peak_checked_out,
                self._peak_open,
                limit_hit,
                tuple(sorted(self._window_drivers)),
                leaks,
            )

    # -- giving connections back ------------------------------------------------------------

    def idle_django(self) -> bool:
        """On the thread that runs the tests, outside any test: its Django connections
        that Django is done with count as idle (given back when asked), the others as in
        use. Returns whether any count changed."""
        try:
            found = self._django.read()
        except Exception as exc:
            self._contain(exc)
            return False
        changed = False
        with self._lock:
            for conn, idle in found:
                record = self._by_conn.get(id(conn))
                if record is None:
                    continue
                record.django = record.pooled = True
                changed |= record.in_use == idle
                self._lend(record, not idle)
        return changed

    def _counted_idle(self, conn: Any) -> bool:
        with self._lock:
            record = self._by_conn.get(id(conn))
            return record is not None and not record.in_use

    def _close_idle_django(self, parked: bool) -> None:
        self._django.close_idle(self._counted_idle, parked=parked)

    def release_idle(self, *, parked: bool = False) -> None:
        """Close idle pooled connections so another worker can have the room (``reclaim``);
        ``parked``: the test thread waits between items, so its Django connections may be
        closed from this one."""
        self._reclaimer.release_idle(parked=parked)

    async def release_idle_async(self) -> None:
        """``release_idle`` from a coroutine: pools of this loop are released by awaiting."""
        await self._reclaimer.release_idle_async()


def _ignore_counts(open_: int, idle: int, released: bool, version: int) -> None:
    """Counts before the side channel exists: nobody to tell yet (``PoolMeter.bind``
    sends the current ones)."""


def _no_gate(background: bool) -> None:
    """The gate before the side channel exists: nobody to ask, so nothing waits."""


def _ignore_error(exc: BaseException) -> None:
    """Kept by the ledger until ``bind`` hands it to the agent."""
