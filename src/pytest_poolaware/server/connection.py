"""The plugin's own connection to the server: opened once, guarded by a deadline.

Every query the plugin sends goes over this one connection (discovery, the monitor's
samples, the sharing's leases), never over the user's, where a query would open a
transaction the test did not ask for. It is autocommit, named, kept alive by TCP
keepalives, and in the maintenance database when the login may connect there; a
watchdog gives it up under a query that waits too long.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import socket
import threading
from collections.abc import Callable
from typing import Any, Final

from pytest_poolaware.shared.clock import monotonic
from pytest_poolaware.shared.errors import first_line
from pytest_poolaware.shared.protocol import ServerSeen

#: Seconds to wait for the server when connecting (libpq's connect_timeout: whole seconds).
CONNECT_TIMEOUT: Final = 5
#: The plugin's own connection, named so that nobody counts it as one of the run's.
APPLICATION_NAME: Final = "pytest-poolaware-monitor"
#: The database the plugin's connection prefers: one no test creates or drops, shared by
#: every suite on the server (``template1`` would block ``CREATE DATABASE``).
MAINTENANCE_DATABASE: Final = "postgres"
#: TCP keepalives on the plugin's connection, so that the server notices a run that died
#: or lost its network within about ``IDLE + INTERVAL * COUNT`` seconds and frees its slot
#: (and whatever it held through that connection).
KEEPALIVE_IDLE: Final = 5
KEEPALIVE_INTERVAL: Final = 2
KEEPALIVE_COUNT: Final = 3
#: Seconds one query on the plugin's own connection may take before the connection is
#: given up: a network that stops delivering without closing (the peer's side still
#: acknowledges, so keepalives see nothing) must not hold the run, which waits on that
#: connection for its counts and its share. Far above what a sample takes on a busy
#: machine.
QUERY_DEADLINE: Final = 15.0
#: Seconds between two looks of the watchdog that enforces ``QUERY_DEADLINE``.
WATCHDOG_INTERVAL: Final = 0.5
#: Seconds a look of the watchdog may come later than ``WATCHDOG_INTERVAL`` before the
#: gap counts as a pause of the whole process (SIGSTOP, a debugger, a suspended machine)
#: rather than a wait on the server: no query of a stopped process is late.
PAUSE_AFTER: Final = 2.0
#: libpq's port when neither the DSN nor PGPORT names one.
DEFAULT_PORT: Final = 5432
#: SQLSTATEs saying the login may not use the maintenance database (it does not exist, no
#: CONNECT privilege, no pg_hba entry): the DSN's own database is used instead.
NO_ACCESS: Final = frozenset({"3D000", "42501", "28000"})
_SQLALCHEMY_DRIVER: Final = re.compile(r"^(postgres(?:ql)?)\+[a-z0-9_]+://", re.IGNORECASE)


def target_database(dsn: str) -> str:
    """The database the DSN's connections use, with libpq's defaults (PGDATABASE, the user)."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    user = params.get("user") or os.environ.get("PGUSER") or getpass.getuser()
    return str(params.get("dbname") or os.environ.get("PGDATABASE") or user)


def login_of_dsn(dsn: str) -> ServerSeen:
    """The server and login a DSN names, with libpq's defaults (PGHOST, PGPORT, PGUSER,
    PGDATABASE), as a worker's driver would report them."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(libpq_dsn(dsn))
    user = str(params.get("user") or os.environ.get("PGUSER") or getpass.getuser())
    return ServerSeen(
        host=str(params.get("host") or os.environ.get("PGHOST") or ""),
        port=int(params.get("port") or os.environ.get("PGPORT") or DEFAULT_PORT),
        dbname=target_database(libpq_dsn(dsn)),
        user=user,
    )


class QueryWaits:
    """The queries under way and how long each has waited, in the time the process ran.

    A process stopped for a minute finds, once resumed, every query older than the
    deadline; the server may have answered long ago. So a gap between two looks of more
    than ``interval + pause_after`` is taken off every wait under way.
    """

    def __init__(
        self,
        deadline: float,
        *,
        interval: float = WATCHDOG_INTERVAL,
        pause_after: float = PAUSE_AFTER,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self.deadline = deadline
        self._interval = interval
        self._pause_after = pause_after
        self._clock = clock
        self._lock = threading.Lock()
        self._began: dict[int, float] = {}  # waits under way: ticket -> when it began
        self._tickets = 0
        self._last_look = clock()

    def begin(self) -> int:
        with self._lock:
            self._tickets += 1
            self._began[self._tickets] = self._clock()
            return self._tickets

    def end(self, ticket: int) -> None:
        with self._lock:
            self._began.pop(ticket, None)

    def overdue(self) -> bool:
        """Whether a query under way has waited past the deadline; called at each look."""
        now = self._clock()
        with self._lock:
            paused = now - self._last_look - self._interval
            self._last_look = now
            if paused > self._pause_after:
                self._began = {t: began + paused for t, began in self._began.items()}
            oldest = min(self._began.values(), default=None)
        return oldest is not None and now - oldest > self.deadline


class GuardedConnection:
    """The plugin's own connection, with a deadline on every query: a watchdog thread
    shuts the socket down under a query that has waited ``deadline`` seconds, so the
    query fails (and whoever ran it makes that a note) instead of waiting for ever.

    Monitoring and sharing use it from several threads: psycopg serialises their
    queries; each ``execute`` counts as one wait, its own and the time it queued, less
    any time the whole process was stopped (``QueryWaits``).
    """

    def __init__(self, connection: Any, deadline: float = QUERY_DEADLINE) -> None:
        self._conn = connection
        self.info = connection.info
        self.deadline = deadline
        self._waits = QueryWaits(deadline)
        #: Set once the watchdog gave the connection up.
        self.timed_out = False
        self._closed = threading.Event()
        self._watchdog = threading.Thread(
            target=self._watch, name="poolaware-connection-watchdog", daemon=True
        )
        self._watchdog.start()

    def execute(self, query: Any, params: Any = None) -> Any:
        ticket = self._waits.begin()
        try:
            return self._conn.execute(query, params)
        finally:
            self._waits.end(ticket)

    @property
    def closed(self) -> bool:
        return bool(self._conn.closed)

    def close(self) -> None:
        self._closed.set()
        self._conn.close()

    def _watch(self) -> None:
        while not self._closed.wait(WATCHDOG_INTERVAL):
            if self._waits.overdue():
                self.timed_out = True
                self._cut()
                return

    def _cut(self) -> None:
        """Shut the socket down under the waiting query: libpq then sees a closed
        connection and the query raises (the file descriptor stays the driver's)."""
        with contextlib.suppress(Exception):
            sock = socket.socket(fileno=os.dup(self._conn.fileno()))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()


def open_connection(dsn: str) -> Any:
    """The plugin's own connection: autocommit, named, with TCP keepalives, in the
    maintenance database when the login may connect there, else in the DSN's own;
    every query on it has a deadline (``GuardedConnection``).

    Raises whatever psycopg raises when neither works (the caller makes it a note).
    """
    return GuardedConnection(_connect(dsn))


def _connect(dsn: str) -> Any:
    import psycopg

    options: dict[str, Any] = {
        "autocommit": True,
        # No server-side prepared statements: behind a pooler in transaction mode the
        # next query may reach another backend, where they do not exist.
        "prepare_threshold": None,
        "connect_timeout": CONNECT_TIMEOUT,
        "application_name": APPLICATION_NAME,
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE,
        "keepalives_interval": KEEPALIVE_INTERVAL,
        "keepalives_count": KEEPALIVE_COUNT,
    }
    if target_database(dsn) != MAINTENANCE_DATABASE:
        try:
            return psycopg.connect(dsn, **options, dbname=MAINTENANCE_DATABASE)
        except psycopg.OperationalError as exc:
            if exc.sqlstate not in NO_ACCESS:
                raise  # the server is not there: a second attempt would only wait again
    return psycopg.connect(dsn, **options)


def libpq_dsn(dsn: str) -> str:
    """A DSN libpq accepts: SQLAlchemy's ``postgresql+driver://`` loses its ``+driver``."""
    return _SQLALCHEMY_DRIVER.sub(r"\1://", dsn.strip())


def connection_failure(conn: Any, exc: BaseException) -> str:
    """Why a query on the plugin's own connection failed, for a note: the error, or the
    deadline when the watchdog gave the connection up."""
    if getattr(conn, "timed_out", False):
        deadline = getattr(conn, "deadline", QUERY_DEADLINE)
        return f"no answer from the server within {deadline:g}s (the network may be down)"
    return first_line(exc)


def close_quietly(conn: Any) -> None:
    """Close a connection that may be broken already: nothing is left to do then."""
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()
