"""The run's first look at the server: open the plugin's own connection, read what the
server allows the login, and choose the budget from it, before any worker starts.

``read_facts`` reads a login's limits and the client backends that hold them (the SQL is
``sql``'s); ``room`` does the arithmetic; ``discover`` puts them together and never
raises: whatever goes wrong is a note, and the run keeps the configured budget.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Final

from pytest_poolaware.server import sql
from pytest_poolaware.server.connection import (
    close_quietly,
    libpq_dsn,
    open_connection,
    target_database,
)
from pytest_poolaware.server.room import (
    NO_ROOM,
    SERVER,
    BudgetChoice,
    Room,
    ServerFacts,
    choose_budget,
    count_clients,
    room_of,
)
from pytest_poolaware.shared.dsn import mask_dsn
from pytest_poolaware.shared.errors import first_line, is_connection_limit_error

#: What a run behind a pooler counts, and what it cannot.
POOLED: Final = (
    "a pooler (pgbouncer) stands between the plugin and the server: the budget holds the "
    "run's connections to the pooler, as its workers count them, within the limits the "
    "server reports for the login; the server's own count shows the pooler's backends, "
    "not the run's connections, so it is not checked against the workers' counts"
)


def read_facts(
    conn: Any, database: str, runs: Collection[int] = (), role: str | None = None
) -> ServerFacts:
    """Read the limits that apply to ``role`` (by default this connection's login) in
    ``database``; the backends ``runs`` (pids) are the run's own, not other clients'."""
    version, max_conn, su_reserved, role, superuser, role_limit = sql.login_limits(conn, role)
    reserved, uses_reserved = sql.reserved(conn, role, int(version))
    database_limit = sql.database_limit(conn, database)
    clients = sql.clients(conn)
    others, of_role, in_database, hidden = count_clients(clients, str(role), database, runs)
    return ServerFacts(
        version=int(version),
        max_connections=int(max_conn),
        superuser_reserved=int(su_reserved),
        reserved=reserved,
        role=str(role),
        superuser=bool(superuser),
        uses_reserved=uses_reserved,
        role_limit=int(role_limit),
        database=database,
        database_limit=database_limit,
        others_server=others,
        others_role=of_role,
        others_database=in_database,
        hidden=hidden,
        own_in_database=conn.info.dbname == database,
        own_in_role=conn.info.user == role,
        clients=clients,
    )


def behind_pooler(conn: Any) -> bool:
    """Whether a pooler (pgbouncer) stands between this connection and the server: the
    backend pid the protocol announced is the pooler's own, not the server's."""
    pid = sql.server_backend_pid(conn)
    return pid is not None and pid != conn.info.backend_pid


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
