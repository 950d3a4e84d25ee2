"""Installing each driver's hooks once the process imports it, and removing them.

The drivers come from the registry (``registry.DRIVERS``); what each hook does is its
driver's own module's business. A driver release whose internals changed fails its
installer: whatever it had patched is put back, and the error goes to ``on_error``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from pytest_poolaware.worker.drivers.base import ConnectionSink, Driver, Hook, Hooking
from pytest_poolaware.worker.drivers.importhook import ImportWatcher
from pytest_poolaware.worker.drivers.registry import DRIVERS, for_sqlalchemy, named
from pytest_poolaware.worker.drivers.watch import BackendExits


class DriverHooks:
    """Installs the hooks of each driver the process imports, once, and removes them.

    Errors while hooking (a driver release that changed the internals its ``Driver``
    lists) leave that module unhooked and are handed to ``on_error``.
    """

    def __init__(
        self,
        sink: ConnectionSink,
        on_error: Callable[[BaseException], None],
        drivers: tuple[Driver, ...] = DRIVERS,
    ) -> None:
        self._sink = sink
        self._on_error = on_error
        self._drivers = drivers
        #: Each watched module, with its driver and the hook it gets.
        self._hooks: dict[str, tuple[Driver, Hook]] = {
            hook.module: (driver, hook) for driver in drivers for hook in driver.hooks
        }
        self._undo: list[Callable[[], None]] = []
        self._hooked: set[str] = set()
        self._watcher: ImportWatcher | None = None
        self._exits = BackendExits(sink.closed, on_error)
        self._lock = threading.RLock()

    @property
    def hooked(self) -> frozenset[str]:
        """The modules hooked so far."""
        return frozenset(self._hooked)

    def install(self) -> None:
        """Hook the drivers already imported, and the others when they are imported."""
        with self._lock:
            if self._watcher is None:
                self._exits = BackendExits(self._sink.closed, self._on_error)
                self._watcher = ImportWatcher(frozenset(self._hooks), self._loaded)
                sys.meta_path.insert(0, self._watcher)
            for name in self._hooks:
                if sys.modules.get(name) is not None:  # None: its import is barred
                    self._loaded(name)

    def _loaded(self, name: str) -> None:
        with self._lock:
            if name in self._hooked or self._watcher is None:
                return
            self._hooked.add(name)
            driver, hook = self._hooks[name]
            undo: list[Callable[[], None]] = []
            try:
                hook.install(Hooking(driver, self._sink, self._exits, undo))
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

    def driver(self, name: str) -> Driver | None:
        """The driver a connection was counted under."""
        return named(name, self._drivers)

    def closing(self, conn: Any, driver: str) -> None:
        """A pool (SQLAlchemy's) is about to close ``conn``. A driver whose close is
        hooked reports it then; any other's is closed here, returning once its backend
        has exited and the close is reported (the pool's own close is then a no-op)."""
        found = self.driver(driver)
        if found is not None and not found.close_hooked:
            conn.close()
            self._exits.closed_sync(conn)

    def sees(self, sqlalchemy_driver: str) -> bool:
        """Whether connections of this SQLAlchemy dialect driver are counted here: its
        driver's connections are hooked (the first of its hooks)."""
        found = for_sqlalchemy(sqlalchemy_driver, self._drivers)
        return found is not None and found.hooks[0].module in self._hooked
