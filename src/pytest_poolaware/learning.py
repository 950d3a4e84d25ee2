"""Controller side: learning the server from the first connection a worker opens.

With no DSN given, the controller cannot read the server's room before the workers
start. It asks the workers to say where their first connection went
(``protocol.ServerSeen``) and holds the run to one connection at a time until it knows:
the first connect request passes, every other one is held. The first ``ServerSeen`` is
read on the plugin's own connection (``server_room.discover``), in a thread of its own
so the scheduler keeps going. Once the room is known the held requests go back to the
scheduler, which follows the new budget. Tests start meanwhile as the stand-in budget
allows (what the last run learned, else the configured budget): only their connections
wait.
"""

from __future__ import annotations

import ipaddress
import queue
import threading
from collections.abc import Callable, Hashable
from typing import Any, Final, Generic, TypeVar

from pytest_poolaware.protocol import RoomRequest, ServerSeen, WorkerMessage
from pytest_poolaware.server_room import Discovery, discover

#: Connect attempts that may end without teaching the server (the connection failed, or
#: its driver did not say where it went) before the run stops trying to learn it.
LEARNING_ATTEMPTS: Final = 3
#: Where the stand-in budget came from when the last run learned it.
REMEMBERED: Final = "as the last run learned it"
#: Where the DSN of the plugin's connection came from, for notes.
LEARNED_ORIGIN: Final = "the first connection a worker opened"

N = TypeVar("N", bound=Hashable)


def names_its_own_machine(host: str) -> bool:
    """Whether a server address means "this machine" wherever it is used: a loopback
    address, ``localhost``, or a Unix-domain socket (a directory, or libpq's default)."""
    if not host or host.startswith("/") or host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def on_this_machine(spec: Any) -> bool:
    """Whether a worker's gateway (``execnet.XSpec``) runs on the controller's machine:
    ``popen``, or a socket server on a loopback address."""
    if getattr(spec, "popen", False):
        return True
    address = getattr(spec, "socket", None)
    if isinstance(address, str):
        return names_its_own_machine(address.rpartition(":")[0].strip("[]"))
    return False


def dsn_of(login: ServerSeen) -> str:
    """A libpq DSN for the plugin's own connection as ``login`` (password included: never
    show it, ``dsn.mask_dsn`` does)."""
    from psycopg.conninfo import make_conninfo

    params: dict[str, str | int] = {
        "host": login.host,
        "port": login.port,
        "dbname": login.dbname,
        "user": login.user,
    }
    if login.password is not None:
        params["password"] = login.password
    return make_conninfo("", **params)


class ServerLearning(Generic[N]):
    """The server learned from the workers' connections, for one run.

    ``seen``, ``hold`` and ``take`` run on the controller's main thread (the scheduler's);
    the discovery runs in a thread and wakes the scheduler with ``wake`` when done.
    ``on_learned(discovery, dsn, login)`` adopts what was found (``login`` None: nothing
    could be learned) and returns the run's new budget.
    """

    def __init__(
        self,
        configured: tuple[int, str] | None,
        inbox: queue.SimpleQueue[tuple[N, WorkerMessage]],
        wake: Callable[[], None],
        on_learned: Callable[[Discovery, str, ServerSeen | None], int],
    ) -> None:
        self._configured = configured
        self._inbox = inbox
        self._wake = wake
        self._on_learned = on_learned
        #: The login being learned from (the first one a worker reported).
        self.login: ServerSeen | None = None
        #: Other logins the run's tests connected as (notes).
        self.others: dict[tuple[str, int, str, str], ServerSeen] = {}
        self._found: Discovery | None = None
        self._dsn = ""
        self._done = threading.Event()
        self._held: list[tuple[N, RoomRequest]] = []
        #: The worker and item whose connect request passed while nothing was learned.
        self._passing: tuple[N, int] | None = None
        self._attempts = 0
        #: True until the room is known (or could not be read) and adopted.
        self.pending = True

    def seen(self, login: ServerSeen, local: bool = True) -> None:
        """A worker opened its first connection as ``login``; ``local``: the worker runs
        on the controller's machine."""
        if not self.pending:  # adopted already, or given up
            if self.login is not None and login.key != self.login.key:
                self.others.setdefault(login.key, login)
            return
        if self.login is None:
            self.login = login
            self._dsn = dsn_of(login)
            if not local and names_its_own_machine(login.host):
                # The address means the worker's machine: here it would name another
                # server, or none. Keep the budget rather than guess.
                self._found = Discovery(
                    notes=[
                        f"the budget was not checked against the server: a worker on another "
                        f"machine connected to {login.host or 'a local socket'}, which names "
                        "its own machine (set POOLAWARE_DSN to an address the controller "
                        "can reach)"
                    ]
                )
                self._done.set()
                self._wake()
                return
            threading.Thread(target=self._discover, name="poolaware-learn", daemon=True).start()
        elif login.key != self.login.key:
            self.others.setdefault(login.key, login)

    def _discover(self) -> None:
        try:
            assert self.login is not None
            runs = [self.login.pid] if self.login.pid else []
            self._found = discover(self._dsn, self._configured, LEARNED_ORIGIN, runs)
        finally:
            self._done.set()
            self._wake()

    def hold(self, node: N, request: RoomRequest) -> bool:
        """Whether ``request`` must wait: one connection at a time until the room is known
        (the first request passes; the others wait for the room)."""
        if not self.pending:
            return False
        if self.login is None and self._passing is None:
            self._passing = (node, request.item)
            return False
        self._held.append((node, request))
        return True

    def item_done(self, node: N, item: int) -> None:
        """An item ended. If it was the one whose connection passed and nothing was
        learned from it (the connection failed, or its driver did not say where it
        went), let the next held request pass; after ``LEARNING_ATTEMPTS`` of those, stop
        trying and keep the budget."""
        if not self.pending or self.login is not None or self._passing != (node, item):
            return
        self._passing = None
        self._attempts += 1
        if self._attempts >= LEARNING_ATTEMPTS:
            self._found = Discovery(
                notes=[
                    f"the budget was not checked against the server: {self._attempts} "
                    "tests connected without the plugin learning where to (set "
                    "POOLAWARE_DSN to read it)"
                ]
            )
            self._done.set()
        elif self._held:
            self._inbox.put(self._held.pop(0))
        self._wake()

    def take(self) -> int | None:
        """Once the server was read: adopt it (once), hand the held requests back to the
        scheduler's inbox, and return the run's new budget; None before, and after."""
        if not self.pending or not self._done.is_set():
            return None
        self.pending = False
        found = self._found if self._found is not None else Discovery()
        budget = self._on_learned(found, self._dsn, self.login)
        for held in self._held:
            self._inbox.put(held)
        self._held.clear()
        return budget

    def notes(self) -> list[str]:
        """What the summary says of the logins seen."""
        notes = []
        if self.login is not None:
            notes.append(
                f"the server and login were learned from {LEARNED_ORIGIN}: {self.login.where()}"
            )
        for other in self.others.values():
            notes.append(
                f"tests also connected as {other.where()}: the budget was computed for "
                f"{self.login.where() if self.login else 'the first login'} (set "
                "POOLAWARE_DSN to the login whose limits bind)"
            )
        return notes
