"""What a driver is to the worker: one ``Driver`` record, and what its hooks are handed.

Everything driver-specific lives in a driver's own module, described by its ``Driver``:
which modules to watch and how to hook each, SQLAlchemy's names for it, how to find a
connection's backend pid and socket, how a close is seen, the login a connection was
opened with, how its pools give idle connections back, and the private internals the
hooks rely on. The rest of the worker (the meter, login, reclaim) asks the record and
never compares a driver's name (``docs/adding-a-driver.md``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pytest_poolaware.worker.drivers.patching import patch

if TYPE_CHECKING:
    from pytest_poolaware.shared.protocol import ServerSeen
    from pytest_poolaware.worker.drivers.watch import BackendExits


@dataclass(frozen=True)
class HookedInternal:
    """One private name of a driver that the hooks rely on.

    ``package`` is the distribution pinned at the matrix's ends: the versions it was
    checked against are ``compat.DRIVERS_TESTED[package]``.
    """

    package: str
    name: str
    why: str


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


#: Installs hooks into a module that was just imported (see ``Hooking``).
Installer = Callable[["Hooking"], None]


@dataclass(frozen=True)
class Hook:
    """The hooks that go in once ``module`` is imported."""

    module: str
    install: Installer


@dataclass(frozen=True)
class Driver:
    """Everything the worker knows about one PostgreSQL driver."""

    #: As the report shows it (a test's ``drivers``) and the sink hears it.
    name: str
    #: Installed as each module is imported. The first makes the connections: while it
    #: is hooked, every connection of the driver is counted (the others hook its pools).
    hooks: tuple[Hook, ...]
    #: SQLAlchemy's dialect driver names (``dialect.driver``) whose connections these are.
    sqlalchemy: tuple[str, ...]
    #: The server's backend pid of an open connection (what the ledger counts by).
    backend_pid: Callable[[Any], int]
    #: The connection's socket descriptor, duplicated to see the backend exit.
    fileno: Callable[[Any], int]
    #: Whether the driver says the connection is closed (checked at every sweep).
    is_closed: Callable[[Any], bool]
    #: Whether ``close()`` is hooked. If not, a connection SQLAlchemy is about to close is
    #: closed by the meter and waited for, so the close is reported when it returns.
    close_hooked: bool
    #: The server and login of an open connection (None: the driver does not say).
    login: Callable[[Any], ServerSeen | None]
    #: The private names the hooks rely on.
    internals: tuple[HookedInternal, ...]
    #: Closes a pool's idle connections now (a pool used from threads); returns how many.
    reclaim: Callable[[Any], int] | None = None
    #: The same for a pool of an event loop, run on that loop.
    reclaim_async: Callable[[Any], Coroutine[Any, Any, int]] | None = None

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(hook.module for hook in self.hooks)


@dataclass(frozen=True)
class Hooking:
    """What an installer is handed: the driver, where to report, the exit watcher, and
    the list of steps that remove what it patched."""

    driver: Driver
    sink: ConnectionSink
    exits: BackendExits
    undo: list[Callable[[], None]]

    def patch(self, owner: Any, name: str, wrapper: Any) -> None:
        """Replace ``owner.name`` by ``wrapper`` until the hooks are removed."""
        patch(owner, name, wrapper, self.undo)

    def opened(self, conn: Any, pool: Any = None) -> None:
        """A connection just opened: watch for its backend's exit, and count it."""
        pid = self.driver.backend_pid(conn)
        fileno = functools.partial(self.driver.fileno, conn)
        self.exits.track(conn, pid, fileno, self.driver.is_closed)
        self.sink.opened(conn, pid, self.driver.name, pool)


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# -- a pool opening a connection ---------------------------------------------------------------

#: The pool (any kind) opening a connection in this context: its connections start idle,
#: and a pool's background growth is delayed at the gate, never refused.
_POOL_OPENING: contextvars.ContextVar[tuple[Any, bool] | None] = contextvars.ContextVar(
    "poolaware_pool_opening", default=None
)


class Opening:
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


def opening_pool() -> Any:
    """The pool opening a connection in this context, or None."""
    opening = _POOL_OPENING.get()
    return None if opening is None else opening[0]


def background() -> bool:
    """Whether a pool's own growth opens the connection in this context."""
    opening = _POOL_OPENING.get()
    return opening is not None and opening[1]
