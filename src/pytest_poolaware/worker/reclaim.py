"""Worker side: giving idle pooled connections back when the controller asks
(``ReleaseIdle``: another worker waits for room, or the budget was lowered), Django's
idle per-thread connections included (``django_conns``).

SQLAlchemy pools with connections checked out are left alone (disposing them would
disturb their overflow accounting); psycopg_pool and asyncpg pools give their idle
connections back whatever is lent out. Asyncio pools are handled on their own event
loop when it is idle; a loop busy in another thread gets the work handed over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pytest_poolaware.worker.drivers import Driver, running_loop
from pytest_poolaware.worker.sqlalchemy_events import SqlAlchemyListeners

#: A driver pool holding idle connections, with the loop it was opened on (asyncio) and
#: its driver, which says how the pool gives them back (``Driver.reclaim``).
IdlePool = tuple[Any, asyncio.AbstractEventLoop | None, Driver]


class Reclaimer:
    """Closes idle pooled connections: SQLAlchemy's pools (found by ``sqlalchemy``) and
    the driver pools ``idle_driver_pools`` lists. Errors go to ``contain``; ``sweep``
    uncounts what was closed (``sweep_async`` too, without blocking the event loop)."""

    def __init__(
        self,
        sqlalchemy: SqlAlchemyListeners,
        *,
        close_django: Callable[[bool], None],
        idle_driver_pools: Callable[[], list[IdlePool]],
        contain: Callable[[BaseException], None],
        sweep: Callable[[], None],
        sweep_async: Callable[[], Awaitable[None]],
    ) -> None:
        self._sqlalchemy = sqlalchemy
        self._close_django = close_django
        self._idle_driver_pools = idle_driver_pools
        self._contain = contain
        self._sweep = sweep
        self._sweep_async = sweep_async

    def release_idle(self, *, parked: bool = False) -> None:
        """Close idle pooled connections so another worker can have the room: Django's
        first (one held from a Django pool goes back to it, and is closed with the pool's
        idle ones); ``parked``: see ``DjangoConnections.close_idle``."""
        try:
            self._close_django(parked)
            self._release_sqlalchemy()
            for pool, loop, driver in self._idle_driver_pools():
                self._release_driver_pool(pool, loop, driver)
        except Exception as exc:
            self._contain(exc)
        self._sweep()

    async def release_idle_async(self) -> None:
        """``release_idle`` from a coroutine: pools of this loop are released by awaiting."""
        current = running_loop()
        try:
            self._release_sqlalchemy()
            for pool in self._sa_pools_of(current):
                from sqlalchemy.util import greenlet_spawn

                await greenlet_spawn(pool.dispose)
            for pool, loop, driver in self._idle_driver_pools():
                if loop is not None and loop is current and driver.reclaim_async is not None:
                    await driver.reclaim_async(pool)
                else:
                    self._release_driver_pool(pool, loop, driver)
            await self._sweep_async()
        except Exception as exc:
            self._contain(exc)

    def _release_sqlalchemy(self) -> None:
        if not self._sqlalchemy.installed:
            return
        for pool in self._releasable_sa_pools():
            loop = self._sqlalchemy.loops.get(pool)
            if loop is None:
                pool.dispose()
            elif not loop.is_closed() and not loop.is_running():
                from sqlalchemy.util import greenlet_spawn

                loop.run_until_complete(greenlet_spawn(pool.dispose))

    def _releasable_sa_pools(self) -> list[Any]:
        from sqlalchemy.pool import QueuePool

        return [
            pool
            for pool in list(self._sqlalchemy.pools)
            if isinstance(pool, QueuePool) and pool.checkedout() == 0 and pool.checkedin() > 0
        ]

    def _sa_pools_of(self, loop: asyncio.AbstractEventLoop | None) -> list[Any]:
        if loop is None or not self._sqlalchemy.installed:
            return []
        loops = self._sqlalchemy.loops
        return [p for p in self._releasable_sa_pools() if loops.get(p) is loop]

    @staticmethod
    def _release_driver_pool(
        pool: Any, loop: asyncio.AbstractEventLoop | None, driver: Driver
    ) -> None:
        """A pool used from threads gives its idle connections back here; an asyncio
        pool's go back on its own loop, run now when idle, else handed the work."""
        if loop is None:
            if driver.reclaim is not None:
                driver.reclaim(pool)
        elif driver.reclaim_async is None or loop.is_closed():
            return
        elif not loop.is_running():
            loop.run_until_complete(driver.reclaim_async(pool))
        elif loop is not running_loop():
            # Running in another thread: hand the work over, never wait on that loop.
            asyncio.run_coroutine_threadsafe(driver.reclaim_async(pool), loop)
