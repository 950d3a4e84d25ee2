"""Worker side: SQLAlchemy's class-level listeners, installed once SQLAlchemy is in use,
and the engines' pools they find (so idle connections can be given back, ``reclaim``).

The meter (``meter.PoolMeter``) supplies the handlers of the pool events: counting is
its own. This module knows SQLAlchemy's event names and which pools there are.
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from pytest_poolaware.worker.drivers import running_loop

#: The ``Pool`` events the meter handles.
POOL_EVENTS = ("connect", "close", "close_detached", "checkout", "checkin")


class SqlAlchemyListeners:
    """Installs the meter's pool listeners and its own engine listeners on SQLAlchemy's
    classes (every engine of the process, present and future).

    ``pool_events``: a handler per ``POOL_EVENTS`` name. ``gate``: called before a
    connection of a dialect whose driver the driver hooks do not ``sees``.
    """

    def __init__(
        self,
        pool_events: Mapping[str, Callable[..., None]],
        *,
        gate: Callable[[bool], None],
        sees: Callable[[str], bool],
        contain: Callable[[BaseException], None],
    ) -> None:
        assert set(pool_events) == set(POOL_EVENTS), sorted(pool_events)
        self._pool_events = dict(pool_events)
        self._gate = gate
        self._sees = sees
        self._contain = contain
        self.pools: weakref.WeakSet[Any] = weakref.WeakSet()
        #: The event loop each asyncio engine's pool was first used on.
        self.loops: weakref.WeakKeyDictionary[Any, asyncio.AbstractEventLoop] = (
            weakref.WeakKeyDictionary()
        )
        self.installed = False

    def install(self) -> None:
        """Listen, if SQLAlchemy is imported (a worker that never imports it should not
        pay for the import)."""
        if self.installed or "sqlalchemy" not in sys.modules:
            return
        from sqlalchemy import event
        from sqlalchemy.engine import Engine
        from sqlalchemy.pool import Pool

        for name, handler in self._pool_events.items():
            event.listen(Pool, name, handler)
        event.listen(Engine, "do_connect", self._on_do_connect)
        event.listen(Engine, "engine_connect", self._on_engine_connect)
        self.installed = True

    def uninstall(self) -> None:
        if not self.installed:
            return
        from sqlalchemy import event
        from sqlalchemy.engine import Engine
        from sqlalchemy.pool import Pool

        for name, handler in self._pool_events.items():
            event.remove(Pool, name, handler)
        event.remove(Engine, "do_connect", self._on_do_connect)
        event.remove(Engine, "engine_connect", self._on_engine_connect)
        self.installed = False

    def _on_do_connect(self, dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> None:
        if not self._sees(getattr(dialect, "driver", "")):
            self._gate(False)  # else the driver's own hook gates it

    def _on_engine_connect(self, connection: Any) -> None:
        """Remember each engine's pool (and asyncio loop) so idle connections can be released."""
        try:
            pool = connection.engine.pool
            if pool not in self.pools:
                self.pools.add(pool)
                loop = running_loop()
                if loop is not None:
                    self.loops[pool] = loop
        except Exception as exc:
            self._contain(exc)
