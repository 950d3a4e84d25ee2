"""What the server allows the run's login: its connection limits and who holds them now.

The budget a user types is a guess; the truth lives on the server (``max_connections``,
the reserved slots, a role's or a database's ``CONNECTION LIMIT``, the connections other
clients hold). The run reads it on the plugin's own connection before any worker starts,
never on the user's (a query there would open a transaction the test did not ask for).

``room_of`` and ``choose_budget`` are pure; ``read_facts`` and ``open_connection`` are
the only parts that talk to the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import re
import socket
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Final

from pytest_poolaware.shared.clock import monotonic
from pytest_poolaware.shared.dsn import mask_dsn
from pytest_poolaware.shared.errors import first_line, is_connection_limit_error

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
#: SQLSTATEs saying the login may not use the maintenance database (it does not exist, no
#: CONNECT privilege, no pg_hba entry): the DSN's own database is used instead.
NO_ACCESS: Final = frozenset({"3D000", "42501", "28000"})
#: What a run behind a pooler counts, and what it cannot.
POOLED: Final = (
    "a pooler (pgbouncer) stands between the plugin and the server: the budget holds the "
    "run's connections to the pooler, as its workers count them, within the limits the "
    "server reports for the login; the server's own count shows the pooler's backends, "
    "not the run's connections, so it is not checked against the workers' counts"
)
#: Why a run is held to one connection at a time.
NO_ROOM: Final = "no room left for this login; one connection at a time"
#: The first PostgreSQL release with ``reserved_connections`` (server_version_num).
RESERVED_CONNECTIONS_SINCE: Final = 160000

SERVER: Final = "server"
ROLE: Final = "role"
DATABASE: Final = "database"

_SQLALCHEMY_DRIVER: Final = re.compile(r"^(postgres(?:ql)?)\+[a-z0-9_]+://", re.IGNORECASE)

#: Words for the plugin's own connection in the budget's source.
OWN_CONNECTION: Final = "1 kept for the monitor"
#: Slots the runs sharing a server leave free for connections another run has closed
#: and the server still counts for a moment (``share``): this run cannot watch those
#: closes. Its own workers' closes need no slot: a worker counts a closed connection
#: until its backend has exited (``docs/design.md``, "A close counts once the server has
#: freed the slot"), so the room itself keeps none.
CLOSING_SLACK: Final = 1


#: A client backend as ``read_facts`` sees it: (pid, role, database, whether its backend
#: type is hidden from this login).
Client = tuple[int, str, str, bool]


@dataclass(frozen=True)
class ServerFacts:
    """What the server says about one login, read in one go (``read_facts``)."""

    version: int  # server_version_num
    max_connections: int
    superuser_reserved: int
    #: ``reserved_connections`` (PostgreSQL 16+; 0 before).
    reserved: int
    role: str
    superuser: bool
    #: Whether the role may use the ``reserved_connections`` slots.
    uses_reserved: bool
    role_limit: int  # -1: none
    database: str
    database_limit: int  # -1: none (or the database was not found)
    #: Client backends other than the plugin's own connection: on the whole server, of
    #: this role, in this database.
    others_server: int
    others_role: int
    others_database: int
    #: Rows of other roles whose backend type this login cannot see (counted as clients).
    hidden: int = 0
    #: Whether the plugin's own connection is in ``database`` (it counts in its limit).
    own_in_database: bool = True
    #: Whether the plugin's own connection logs in as ``role`` (it counts in its limit):
    #: not when the facts are those of another login the run's tests use.
    own_in_role: bool = True
    #: The client backends seen, so that the counts can be taken again once more of
    #: the run's own backends are known (``recount``).
    clients: tuple[Client, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Room:
    """The connections the run may open: the tightest of the limits that apply."""

    #: What the run's workers may hold at once: the limit, less what other clients hold,
    #: less the plugin's own connection where it counts. May be 0 or less: no room.
    budget: int
    #: The binding limit, in words ("role acc_app CONNECTION LIMIT 16").
    limit: str
    #: That limit's number: what the server allows this login in all.
    allows: int
    others: int
    own: int  # 1 when the plugin's connection counts against the binding limit
    #: Which limit binds: ``SERVER``, ``ROLE`` or ``DATABASE``.
    scope: str = "server"

    def describe(self) -> str:
        """ "role acc_app CONNECTION LIMIT 16, 1 kept for the monitor"."""
        parts = [self.limit]
        if self.others:
            parts.append(f"{self.others} held by other clients")
        if self.own:
            parts.append(OWN_CONNECTION)
        return ", ".join(parts)


def room_of(facts: ServerFacts) -> Room:
    """The tightest limit for this login: the server's slots, the role's and the
    database's ``CONNECTION LIMIT`` (superusers are exempt from those two)."""
    reserved = facts.superuser_reserved + (0 if facts.uses_reserved else facts.reserved)
    if facts.superuser:
        return Room(
            facts.max_connections - facts.others_server - 1,
            f"max_connections {facts.max_connections}",
            facts.max_connections,
            facts.others_server,
            1,
        )
    words = f"max_connections {facts.max_connections}"
    if reserved:
        words += f" less {reserved} reserved"
    allows = facts.max_connections - reserved
    rooms = [Room(allows - facts.others_server - 1, words, allows, facts.others_server, 1)]
    if facts.role_limit >= 0:
        own = 1 if facts.own_in_role else 0
        rooms.append(
            Room(
                facts.role_limit - facts.others_role - own,
                f"role {facts.role} CONNECTION LIMIT {facts.role_limit}",
                facts.role_limit,
                facts.others_role,
                own,
                ROLE,
            )
        )
    if facts.database_limit >= 0:
        own = 1 if facts.own_in_database else 0
        rooms.append(
            Room(
                facts.database_limit - facts.others_database - own,
                f"database {facts.database} CONNECTION LIMIT {facts.database_limit}",
                facts.database_limit,
                facts.others_database,
                own,
                DATABASE,
            )
        )
    # Ties go to the narrowest limit: it is the one a user recognises and can change.
    return min(reversed(rooms), key=lambda room: room.budget)


#: How the warning of a configured budget above the room begins.
CONFIGURED_TOO_LARGE: Final = "the configured budget"


@dataclass(frozen=True)
class BudgetChoice:
    budget: int
    source: str
    #: Shown once in the summary: the configured budget was more than the server allows.
    warning: str | None = None
    #: The server has no room for the run's workers as things stand.
    no_room: bool = False


def choose_budget(configured: tuple[int, str] | None, room: Room) -> BudgetChoice:
    """The run's budget: the discovered room, or the configured budget when it is smaller.

    ``configured`` is (budget, where it came from) when the user set one. With no room at
    all the run is held to one connection at a time (the tests will meet the server's
    limit and say so), never to zero, which would stop it for good.
    """
    if room.budget < 1:
        return BudgetChoice(1, f"{room.describe()}: {NO_ROOM}", no_room=True)
    if configured is None:
        return BudgetChoice(room.budget, room.describe())
    wanted, origin = configured
    if wanted <= room.budget:
        return BudgetChoice(wanted, origin)
    warning = (
        f"{CONFIGURED_TOO_LARGE} {wanted} ({origin}) is more than the server allows this "
        f"login ({room.describe()}): the run uses {room.budget}"
    )
    return BudgetChoice(room.budget, f"{room.describe()}; configured {wanted}", warning)


# -- talking to the server -------------------------------------------------------------------

#: Of the connection's own login, or of the role named (another login of the run's tests:
#: ``pg_roles`` is readable by any login).
_SETTINGS: Final = """
SELECT current_setting('server_version_num')::int,
       current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       r.rolname, r.rolsuper, r.rolconnlimit
FROM pg_roles r WHERE r.rolname = COALESCE(%s::name, current_user)
"""
_RESERVED: Final = """
SELECT current_setting('reserved_connections')::int,
       pg_has_role(%s::name, 'pg_use_reserved_connections', 'USAGE')
"""
_DATABASE_LIMIT: Final = "SELECT datconnlimit FROM pg_database WHERE datname = %s"
#: Client backends other than this one. A login without ``pg_read_all_stats`` sees other
#: roles' rows with no backend type: those with a role and a database are clients (a
#: background worker has neither), so they are counted, on the safe side.
_CLIENTS: Final = """
SELECT pid, COALESCE(usename, ''), COALESCE(datname, ''), backend_type IS NULL
FROM pg_stat_activity
WHERE pid <> pg_backend_pid()
  AND (backend_type = 'client backend'
       OR (backend_type IS NULL AND usesysid IS NOT NULL AND datid IS NOT NULL))
"""


def count_clients(
    clients: Collection[Client], role: str, database: str, runs: Collection[int] = ()
) -> tuple[int, int, int, int]:
    """Other clients' backends (not those of ``runs``, the run's own): on the whole
    server, of ``role``, in ``database``, and those whose backend type is hidden."""
    runs = set(runs)
    others = [client for client in clients if client[0] not in runs]
    return (
        len(others),
        sum(1 for _, of_role, _, _ in others if of_role == role),
        sum(1 for _, _, in_database, _ in others if in_database == database),
        sum(1 for *_, hidden in others if hidden),
    )


def recount(facts: ServerFacts, runs: Collection[int]) -> ServerFacts:
    """The facts with the backends ``runs`` counted as the run's own, not other clients'
    (pids the run learned to be its own after the facts were read)."""
    others, of_role, in_database, hidden = count_clients(
        facts.clients, facts.role, facts.database, runs
    )
    return dataclasses.replace(
        facts,
        others_server=others,
        others_role=of_role,
        others_database=in_database,
        hidden=hidden,
    )


def read_facts(
    conn: Any, database: str, runs: Collection[int] = (), role: str | None = None
) -> ServerFacts:
    """Read the limits that apply to ``role`` (by default this connection's login) in
    ``database``; the backends ``runs`` (pids) are the run's own, not other clients'."""
    version, max_conn, su_reserved, role, superuser, role_limit = conn.execute(
        _SETTINGS, (role,)
    ).fetchone()
    reserved, uses_reserved = 0, False
    if version >= RESERVED_CONNECTIONS_SINCE:
        reserved, uses_reserved = conn.execute(_RESERVED, (role,)).fetchone()
    row = conn.execute(_DATABASE_LIMIT, (database,)).fetchone()
    database_limit = -1 if row is None else int(row[0])
    clients = tuple(
        (int(pid), str(of_role), str(in_database), bool(hidden))
        for pid, of_role, in_database, hidden in conn.execute(_CLIENTS).fetchall()
    )
    others, of_role, in_database, hidden = count_clients(clients, str(role), database, runs)
    return ServerFacts(
        version=int(version),
        max_connections=int(max_conn),
        superuser_reserved=int(su_reserved),
        reserved=int(reserved),
        role=str(role),
        superuser=bool(superuser),
        uses_reserved=bool(uses_reserved),
        role_limit=int(role_limit),
        database=database,
        database_limit=database_limit,
        others_server=int(others),
        others_role=int(of_role),
        others_database=int(in_database),
        hidden=hidden,
        own_in_database=conn.info.dbname == database,
        own_in_role=conn.info.user == role,
        clients=clients,
    )


def behind_pooler(conn: Any) -> bool:
    """Whether a pooler (pgbouncer) stands between this connection and the server: the
    backend pid the protocol announced is the pooler's own, not the server's."""
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    return row is not None and int(row[0]) != conn.info.backend_pid


def target_database(dsn: str) -> str:
    """The database the DSN's connections use, with libpq's defaults (PGDATABASE, the user)."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    user = params.get("user") or os.environ.get("PGUSER") or getpass.getuser()
    return str(params.get("dbname") or os.environ.get("PGDATABASE") or user)


class GuardedConnection:
    """The plugin's own connection, with a deadline on every query: a watchdog thread
    shuts the socket down under a query that has waited ``deadline`` seconds, so the
    query fails (and whoever ran it makes that a note) instead of waiting for ever.

    Monitoring and sharing use it from several threads: psycopg serialises their
    queries; each ``execute`` counts as one wait, its own and the time it queued.
    """

    def __init__(self, connection: Any, deadline: float = QUERY_DEADLINE) -> None:
        self._conn = connection
        self.info = connection.info
        self.deadline = deadline
        self._lock = threading.Lock()
        self._busy: dict[int, float] = {}  # waits under way: ticket -> when it began
        self._tickets = 0
        #: Set once the watchdog gave the connection up.
        self.timed_out = False
        self._closed = threading.Event()
        self._watchdog = threading.Thread(
            target=self._watch, name="poolaware-connection-watchdog", daemon=True
        )
        self._watchdog.start()

    def execute(self, query: Any, params: Any = None) -> Any:
        with self._lock:
            self._tickets += 1
            ticket = self._tickets
            self._busy[ticket] = monotonic()
        try:
            return self._conn.execute(query, params)
        finally:
            with self._lock:
                self._busy.pop(ticket, None)

    @property
    def closed(self) -> bool:
        return bool(self._conn.closed)

    def close(self) -> None:
        self._closed.set()
        self._conn.close()

    def _watch(self) -> None:
        while not self._closed.wait(WATCHDOG_INTERVAL):
            with self._lock:
                oldest = min(self._busy.values(), default=None)
            if oldest is not None and monotonic() - oldest > self.deadline:
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


@dataclass
class Discovery:
    """What the run learned from the server before any worker started."""

    #: The plugin's own connection, open for the run (None: the server was not reached,
    #: or it has no slot to spare for it).
    connection: Any = None
    facts: ServerFacts | None = None
    room: Room | None = None
    choice: BudgetChoice | None = None
    #: A pooler (pgbouncer) stands between the plugin and the server.
    pooled: bool = False
    notes: list[str] = field(default_factory=list)


def discover(
    dsn: str, configured: tuple[int, str] | None, origin: str = "", runs: Collection[int] = ()
) -> Discovery:
    """Open the plugin's connection and choose the run's budget from what the server allows.

    Never raises: a server that cannot be reached or read is a note, and the run keeps
    the configured budget. ``origin`` says where the DSN came from, for that note;
    ``runs`` are backend pids of the run's own connections open already.
    """
    found = Discovery()
    try:
        import psycopg  # noqa: F401  (the driver the plugin's connection needs)
    except ImportError:
        found.notes.append(
            "server monitoring and budget discovery off: they need psycopg (pip install psycopg)"
        )
        return found
    try:
        found.connection = open_connection(libpq_dsn(dsn))
        found.facts = read_facts(found.connection, target_database(libpq_dsn(dsn)), runs)
    except Exception as exc:
        close_quietly(found.connection)
        found.connection = None
        if is_connection_limit_error(exc):
            # Full already: the run's tests would meet the same answer.
            found.choice = BudgetChoice(1, f"{NO_ROOM} ({first_line(exc)})", no_room=True)
            found.notes.append(f"server monitoring off: {found.choice.source}")
            return found
        where = f"DSN from {origin}; " if origin else ""
        found.notes.append(
            f"server monitoring off: cannot use {mask_dsn(dsn)}: {first_line(exc)} "
            f"({where}--poolaware-monitor=off turns monitoring off); the budget was not "
            "checked against the server"
        )
        return found
    try:
        found.pooled = behind_pooler(found.connection)
    except Exception:  # it answered the facts: count it as direct
        found.pooled = False
    if found.pooled:
        found.notes.append(POOLED)
    found.room = room_of(found.facts)
    found.choice = choose_budget(configured, found.room)
    if found.choice.no_room:
        # Its slot is worth more to the tests than monitoring is.
        close_quietly(found.connection)
        found.connection = None
        found.notes.append(f"server monitoring off: {found.choice.source}")
    if found.facts.hidden and found.room.scope == SERVER and not found.facts.superuser:
        found.notes.append(
            f"role {found.facts.role} cannot see the backend type of other roles' "
            f"connections: {found.facts.hidden} of them were counted as clients "
            "(GRANT pg_read_all_stats for an exact count)"
        )
    return found


def close_quietly(conn: Any) -> None:
    """Close a connection that may be broken already: nothing is left to do then."""
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()
