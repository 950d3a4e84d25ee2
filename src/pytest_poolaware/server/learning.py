"""Controller side: learning the server from the first connection a worker opens.

With no DSN given, the controller cannot read the server's room before the workers
start. It asks the workers to say where their first connection went
(``protocol.ServerSeen``) and holds the run to one connection at a time until it knows:
the first connect request passes (and its worker's next ones), every other one is held.
The first ``ServerSeen`` is read on the plugin's own connection (``discovery.discover``),
in a thread of its own so the scheduler keeps going. Once the room is known the held
requests go back to the scheduler, which follows the new budget. Tests start meanwhile
as the stand-in budget allows (what the last run learned, else the configured budget):
only their connections wait.

A later ``ServerSeen`` of another login (role or database) on the same server is read
the same way, on the plugin's connection (``read_login``), while every new connect
request waits (``LOGIN_READ_HOLD`` at most); the controller then lowers the run's budget
to the tightest room among the logins learned (``on_login``). A login on another server
is only named in a note.
"""

from __future__ import annotations

import contextlib
import importlib
import ipaddress
import queue
import threading
from collections.abc import Callable, Collection, Hashable
from typing import Any, Final, Generic, TypeVar

from pytest_poolaware.server.discovery import Discovery, discover
from pytest_poolaware.server.room import ServerFacts
from pytest_poolaware.shared.clock import monotonic
from pytest_poolaware.shared.errors import first_line
from pytest_poolaware.shared.protocol import RoomRequest, ServerSeen, WorkerMessage

#: Connect attempts that may end without teaching the server (the connection failed, or
#: its driver did not say where it went) before the run stops trying to learn it.
LEARNING_ATTEMPTS: Final = 3
#: Where the stand-in budget came from when the last run learned it.
REMEMBERED: Final = "as the last run learned it"
#: Other databases of one login named in its note, at most.
SHOWN_DATABASES: Final = 3
#: Where the DSN of the plugin's connection came from, for notes.
LEARNED_ORIGIN: Final = "the first connection a worker opened"
#: Why a connect is held (the cause of a fault, if it waited long): the server is learned
#: one worker at a time and the first connection has not taught it yet; the server's
#: room is being read; another login's is.
HELD_FOR_FIRST: Final = (
    "the server was learned one worker at a time, and the first connection had not taught it yet"
)
HELD_FOR_ROOM: Final = "the server's room was being read, from the first connection opened"
HELD_FOR_LOGIN: Final = "another login's room was being read"
#: Seconds new connects wait for another login's room to be read. The reading takes a
#: few milliseconds; one that takes longer (the plugin's connection busy, a loaded
#: server) goes on without holding them, and its room lowers the budget once read.
LOGIN_READ_HOLD: Final = 0.5

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


def import_driver_ahead() -> None:
    """Import psycopg in a thread of its own while the workers start: reading the room
    from the first connection, which every other connect waits for, then does not wait
    for the import as well (a third of a second on a busy machine, more than the
    reading itself)."""
    threading.Thread(target=_import_driver, name="poolaware-import", daemon=True).start()


def _import_driver() -> None:
    with contextlib.suppress(Exception):  # the reading says what went wrong, if anything
        importlib.import_module("psycopg")


def same_server(one: ServerSeen, other: ServerSeen) -> bool:
    """Whether two logins name the same server (host and port, as the drivers said)."""
    return (one.host, one.port) == (other.host, other.port)


#: Reads what the server allows another login (on the plugin's connection), given the
#: backend pids known to be the run's; raises when it cannot.
ReadLogin = Callable[[ServerSeen, Collection[int]], ServerFacts]
#: Adopts what was read of another login (the facts, or why they could not be read) with
#: the run's backend pids known by then; returns the run's new budget (None: unchanged).
OnLogin = Callable[[ServerSeen, ServerFacts | str, Collection[int]], int | None]


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


class LoginReads:
    """The other logins on the learned server, read one at a time on the plugin's
    connection (``read_login``), each in a thread of its own; ``wake`` when one is read,
    and when its hold on new connects is over (``LOGIN_READ_HOLD``)."""

    def __init__(
        self,
        read_login: ReadLogin,
        wake: Callable[[], None],
        *,
        read_hold: float = LOGIN_READ_HOLD,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._read_login = read_login
        self._wake = wake
        self._read_hold = read_hold
        self._clock = clock
        #: Logins waiting to be read, the one being read, and when its reading began.
        self.waiting: list[ServerSeen] = []
        self.reading: ServerSeen | None = None
        self._began = 0.0
        #: What was read of it (facts, or why not), once ``_done``.
        self.result: ServerFacts | str = ""
        self._done = threading.Event()

    def start_next(self, runs: list[int], *, holds: bool) -> None:
        """Read the next login waiting (if none is being read); ``holds``: new connects
        wait for it, so its hold's end wakes the scheduler too."""
        if self.reading is not None or not self.waiting:
            return
        self.reading = self.waiting.pop(0)
        self._done.clear()
        self._began = self._clock()
        threading.Thread(
            target=self._read, args=(self.reading, runs), name="poolaware-login", daemon=True
        ).start()
        if holds:
            timer = threading.Timer(self._read_hold, self._wake)
            timer.daemon = True
            timer.start()

    def within_hold(self) -> bool:
        """Whether a login is being read since less than ``LOGIN_READ_HOLD``."""
        return self.reading is not None and self._clock() - self._began < self._read_hold

    def finished(self) -> ServerSeen | None:
        """The login read, once its reading is over (its ``result`` says what was read)."""
        if self.reading is None or not self._done.is_set():
            return None
        login, self.reading = self.reading, None
        return login

    def _read(self, login: ServerSeen, runs: list[int]) -> None:
        try:
            self.result = self._read_login(login, runs)
        except Exception as exc:  # any failure is a note: the budget stays as it is
            self.result = first_line(exc)
        finally:
            self._done.set()
            self._wake()


class ServerLearning(Generic[N]):
    """The server learned from the workers' connections, for one run.

    ``seen``, ``hold`` and ``take`` run on the controller's main thread (the scheduler's);
    the discoveries run in threads and wake the scheduler with ``wake`` when done.
    ``on_learned(discovery, dsn, login)`` adopts what was found (``login`` None: nothing
    could be learned) and returns the run's new budget. ``read_login`` and ``on_login``
    do the same for each other login on that server (without them, other logins are
    only named in a note).
    """

    def __init__(
        self,
        configured: tuple[int, str] | None,
        inbox: queue.SimpleQueue[tuple[N, WorkerMessage]],
        wake: Callable[[], None],
        on_learned: Callable[[Discovery, str, ServerSeen | None], int],
        *,
        read_login: ReadLogin | None = None,
        on_login: OnLogin | None = None,
        read_hold: float = LOGIN_READ_HOLD,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._configured = configured
        self._inbox = inbox
        self._wake = wake
        self._on_learned = on_learned
        self._on_login = on_login
        #: Other logins on the same server, read one at a time (None: not read).
        self._reads = (
            None
            if read_login is None
            else LoginReads(read_login, wake, read_hold=read_hold, clock=clock)
        )
        #: The login being learned from (the first one a worker reported).
        self.login: ServerSeen | None = None
        #: Other logins the run's tests connected as, not read (notes): on another
        #: server, or with nothing to read them with.
        self.others: dict[tuple[str, int, str, str], ServerSeen] = {}
        #: Other logins on the same server: read (or being read, or waiting to be).
        self.checked: dict[tuple[str, int, str, str], ServerSeen] = {}
        #: Other databases the run's tests used as a login already read (pytest-django
        #: makes one per worker): read without holding connects, said only if one has a
        #: ``CONNECTION LIMIT`` of its own; by (host, port, user), in the order seen.
        self.databases: dict[tuple[str, int, str], list[str]] = {}
        #: Backend pids of the run's connections the workers reported (not other clients').
        self.pids: list[int] = []
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
        if login.pid:
            self.pids.append(login.pid)
        if self.login is None:
            if not self.pending:  # given up: nothing is read any more
                return
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
            return
        key = login.key
        if key == self.login.key or key in self.others or key in self.checked:
            return
        elsewhere = not local and names_its_own_machine(login.host)
        if self._reads is None or elsewhere or not same_server(login, self.login):
            self.others[key] = login
            return
        self.checked[key] = login
        if self._same_role(login):
            self.databases.setdefault((login.host, login.port, login.user), []).append(login.dbname)
        self._reads.waiting.append(login)
        self._next_check()

    def _same_role(self, login: ServerSeen) -> bool:
        """Whether ``login`` is a login already read, in another database: its server's
        and role's limits are already in the budget; only that database's own limit, if
        it has one, could lower it."""
        assert self.login is not None
        known = [self.login, *(c for c in self.checked.values() if c is not login)]
        return any(same_server(login, k) and login.user == k.user for k in known)

    def _quiet(self, login: ServerSeen) -> bool:
        """Whether ``login`` was taken as another database of a login already read."""
        return login.dbname in self.databases.get((login.host, login.port, login.user), ())

    def _discover(self) -> None:
        try:
            assert self.login is not None
            runs = [self.login.pid] if self.login.pid else []
            self._found = discover(self._dsn, self._configured, LEARNED_ORIGIN, runs)
        finally:
            self._done.set()
            self._wake()

    def _next_check(self) -> None:
        """Read the next login waiting to be read, once the first is adopted (its
        connection is the one read on), one at a time."""
        reads = self._reads
        if self.pending or reads is None or reads.reading is not None or not reads.waiting:
            return
        reads.start_next(list(self.pids), holds=not self._quiet(reads.waiting[0]))

    def _holding_for_read(self) -> bool:
        """Whether new connects wait for the login being read: one not read before, for
        ``LOGIN_READ_HOLD`` at most."""
        reads = self._reads
        return (
            reads is not None
            and reads.reading is not None
            and not self._quiet(reads.reading)
            and reads.within_hold()
        )

    def hold(self, node: N, request: RoomRequest) -> str | None:
        """Why ``request`` must wait (None: it need not): one worker at a time until the
        room is known (the first request passes, and so do its worker's next ones; the
        others wait for the room), and every one while another login's room is read
        (``LOGIN_READ_HOLD`` at most)."""
        if not self.pending and not self._holding_for_read():
            return None  # nothing is read, only another database of a login read, or late
        learning = self.pending and self.login is None
        if learning and (self._passing is None or self._passing[0] == node):
            # The worker with the pass asking again: what passed taught nothing (yet),
            # and held, this connect would wait for its own item's end, which it blocks.
            # The pass follows the worker's latest item.
            self._passing = (node, request.item)
            return None
        self._held.append((node, request))
        if learning:
            return HELD_FOR_FIRST
        if self.pending:
            return HELD_FOR_ROOM
        reading = self._reads.reading if self._reads is not None else None
        return HELD_FOR_LOGIN if reading is None else f"{HELD_FOR_LOGIN} ({reading.where()})"

    def item_done(self, node: N, item: int) -> None:
        """An item ended. If it was the one whose connection passed and nothing was
        learned from it (the connection failed, or its driver did not say where it
        went), let the next held request pass; after ``LEARNING_ATTEMPTS`` of those, stop
        trying and keep the budget. A connection that passed outside any test (session
        start, say) is over once its worker has ended an item."""
        if not self.pending or self.login is not None or self._passing is None:
            return
        passing_node, passing_item = self._passing
        if passing_node != node or (passing_item != item and passing_item >= 0):
            return
        self._pass_next()

    def worker_gone(self, node: N) -> None:
        """A worker went away (before it joined, perhaps while its session started): its
        held requests go, and if its connection was the one that passed, the next may."""
        self._held = [(n, r) for n, r in self._held if n != node]
        if (
            self.pending
            and self.login is None
            and self._passing is not None
            and self._passing[0] == node
        ):
            self._pass_next()

    def _pass_next(self) -> None:
        """The connection that passed taught nothing: let the next held request pass."""
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
        """Once the server (or another login's room) was read: adopt it (once), hand the
        held requests back to the scheduler's inbox, and return the run's new budget;
        None when there is nothing new (or the budget stays). A reading that outlasted
        its hold hands the held requests back before it is done."""
        if self.pending:
            if not self._done.is_set():
                return None
            self.pending = False
            found = self._found if self._found is not None else Discovery()
            budget: int | None = self._on_learned(found, self._dsn, self.login)
        elif self._reads is not None and (login := self._reads.finished()) is not None:
            assert self._on_login is not None
            read = self._reads.result
            limited = isinstance(read, ServerFacts) and read.database_limit >= 0
            if self._quiet(login) and not limited:
                budget = None  # the same role, in a database with no limit of its own
            else:
                if self._quiet(login):  # its own limit: said in a note of its own
                    self.databases[(login.host, login.port, login.user)].remove(login.dbname)
                budget = self._on_login(login, read, list(self.pids))
        else:
            if not self.pending and not self._holding_for_read():
                self._hand_back()  # the reading outlasted its hold: it goes on without them
            return None
        self._hand_back()
        self._next_check()
        return budget

    def _hand_back(self) -> None:
        """The held requests go back to the scheduler's inbox, in the order they came."""
        for held in self._held:
            self._inbox.put(held)
        self._held.clear()

    def notes(self) -> list[str]:
        """What the summary says of the logins seen (those read say their own, through
        ``on_login``)."""
        notes = []
        if self.login is not None:
            notes.append(
                f"the server and login were learned from {LEARNED_ORIGIN}: {self.login.where()}"
            )
        for (host, port, user), names in self.databases.items():
            if not names:
                continue
            shown = ", ".join(names[:SHOWN_DATABASES])
            if len(names) > SHOWN_DATABASES:
                shown += ", ..."
            notes.append(
                f"tests also used {len(names)} other databases as {user}@{host}:{port} "
                f"({shown}), in the same role's room: none has a connection limit of its own"
            )
        for other in self.others.values():
            elsewhere = self.login is not None and not same_server(other, self.login)
            notes.append(
                f"tests also connected as {other.where()}"
                + (", on another server" if elsewhere else "")
                + ": the budget was computed for "
                + (self.login.where() if self.login else "the first login")
                + " (set POOLAWARE_DSN to the login whose limits bind)"
            )
        return notes
