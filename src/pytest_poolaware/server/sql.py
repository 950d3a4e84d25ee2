"""Every SQL text the server code sends, and the small functions that send them.

One place to read what the plugin asks the server, all of it on the plugin's own
connection: a login's limits and the client backends that hold them (``discovery``), the
run's backends sampled (``monitor``), the advisory locks runs share the room with
(``leases``). What a client backend is, is said once (``client_backends``). The
connection is always the caller's, so nothing here imports a driver; the functions only
turn rows into plain values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from pytest_poolaware.server.room import DATABASE, ROLE, Client

# -- client backends --------------------------------------------------------------------------

#: A session some client opened: what every connection limit counts (not a background
#: worker, nor a parallel worker of a client's query).
CLIENT_BACKEND: Final = "backend_type = 'client backend'"
#: A row whose backend type this login may not see (another role's, without
#: ``pg_read_all_stats``): with a role and a database, it is a client backend or a
#: parallel worker of one's query; a background worker has neither.
HIDDEN_CLIENT: Final = "backend_type IS NULL AND usesysid IS NOT NULL AND datid IS NOT NULL"


def client_backends(*, hidden_too: bool) -> str:
    """The filter of client backends in ``pg_stat_activity``, this session left out.

    ``hidden_too`` counts the rows whose backend type is hidden as clients as well: the
    safe side where other clients' connections are counted to leave them their slots
    (the room, the sharing's live count), since a parallel worker taken for a client can
    only lower the budget. The monitor counts the run's own backends instead, to set the
    server's count beside the workers' (a connection the server holds and no worker
    counted is reported): a parallel worker of a test's query is no connection, so it
    counts only what it can tell is a client backend. A login sees its own role's rows in
    full, so nothing of the plugin's own login is missed; another login's rows are
    hidden unless the plugin's login may read all statistics (``pg_read_all_stats``).
    """
    kind = f"({CLIENT_BACKEND} OR ({HIDDEN_CLIENT}))" if hidden_too else CLIENT_BACKEND
    return f"{kind} AND pid <> pg_backend_pid()"


#: Other clients' backends, counted on the safe side.
OTHER_CLIENTS: Final = client_backends(hidden_too=True)
#: The run's own backends, counted exactly.
RUN_CLIENTS: Final = client_backends(hidden_too=False)

# -- a login's limits (``discovery``) -------------------------------------------------------

#: Of the connection's own login, or of the role named (another login of the run's tests:
#: ``pg_roles`` is readable by any login).
LOGIN_LIMITS: Final = """
SELECT current_setting('server_version_num')::int,
       current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       r.rolname, r.rolsuper, r.rolconnlimit
FROM pg_roles r WHERE r.rolname = COALESCE(%s::name, current_user)
"""
#: PostgreSQL 16's ``reserved_connections``, and whether the role may use them.
RESERVED: Final = """
SELECT current_setting('reserved_connections')::int,
       pg_has_role(%s::name, 'pg_use_reserved_connections', 'USAGE')
"""
#: The first PostgreSQL release with ``reserved_connections`` (server_version_num).
RESERVED_CONNECTIONS_SINCE: Final = 160000
DATABASE_LIMIT: Final = "SELECT datconnlimit FROM pg_database WHERE datname = %s"
#: Client backends other than this one, with their role and database.
CLIENTS: Final = f"""
SELECT pid, COALESCE(usename, ''), COALESCE(datname, ''), backend_type IS NULL
FROM pg_stat_activity
WHERE {OTHER_CLIENTS}
"""
#: The backend this connection reached (a pooler announces its own pid instead).
BACKEND_PID: Final = "SELECT pg_backend_pid()"


def login_limits(conn: Any, role: str | None) -> tuple[Any, ...]:
    """(server_version_num, max_connections, superuser_reserved_connections, role,
    superuser, role CONNECTION LIMIT) of ``role``, by default the connection's login."""
    row = conn.execute(LOGIN_LIMITS, (role,)).fetchone()
    if row is None:
        raise LookupError(f"no role {role} on the server")
    return tuple(row)


def reserved(conn: Any, role: str, version: int) -> tuple[int, bool]:
    """``reserved_connections`` and whether ``role`` may use them (none before 16)."""
    if version < RESERVED_CONNECTIONS_SINCE:
        return 0, False
    slots, uses = conn.execute(RESERVED, (role,)).fetchone()
    return int(slots), bool(uses)


def database_limit(conn: Any, database: str) -> int:
    """The database's ``CONNECTION LIMIT`` (-1: none, or no such database)."""
    row = conn.execute(DATABASE_LIMIT, (database,)).fetchone()
    return -1 if row is None else int(row[0])


def clients(conn: Any) -> tuple[Client, ...]:
    """The other client backends on the server, counted on the safe side."""
    return tuple(
        (int(pid), str(of_role), str(in_database), bool(hidden))
        for pid, of_role, in_database, hidden in conn.execute(CLIENTS).fetchall()
    )


def server_backend_pid(conn: Any) -> int | None:
    """The pid of the backend the connection's queries run on, as the server says it."""
    row = conn.execute(BACKEND_PID).fetchone()
    return None if row is None else int(row[0])


# -- the run's backends sampled (``monitor``) ------------------------------------------------
# Every sample begins "SELECT pid FROM pg_stat_activity", and no other query does: a
# test tells the monitor's samples apart by that (tests/test_routes.py).

#: The monitor's own login: its role, whether a superuser, and its role's limit.
CURRENT_ROLE: Final = (
    "SELECT current_user, r.rolsuper, r.rolconnlimit FROM pg_roles r WHERE r.rolname = current_user"
)
#: A role with a connection limit: count what that limit counts, every connection of it.
#: Backend pids, not just a count: workers check what they counted against them.
ROLE_PIDS: Final = f"SELECT pid FROM pg_stat_activity WHERE {RUN_CLIENTS} AND usename = %s"
#: A superuser (whose connections no limit counts): the connections the engine helper tagged.
TAGGED_PIDS: Final = (
    f"SELECT pid FROM pg_stat_activity WHERE {RUN_CLIENTS} AND application_name LIKE %s"
)
#: Tests that connect as several logins: every connection of the non-superuser roles,
#: and the tagged ones when a superuser is among them.
LOGINS_PIDS: Final = (
    f"SELECT pid FROM pg_stat_activity WHERE {RUN_CLIENTS} "
    "AND (usename = ANY(%s::name[]) OR (%s AND application_name LIKE %s))"
)


def current_role(conn: Any) -> tuple[str, bool, int] | None:
    """The connection's login: (role, superuser, role CONNECTION LIMIT)."""
    row = conn.execute(CURRENT_ROLE).fetchone()
    return None if row is None else (str(row[0]), bool(row[1]), int(row[2]))


def backend_pids(conn: Any, query: str, params: tuple[Any, ...]) -> frozenset[int]:
    """The backend pids one of the monitor's queries lists."""
    return frozenset(int(pid) for (pid,) in conn.execute(query, params).fetchall())


# -- the advisory locks runs share the room with (``leases``) -------------------------------

#: The granted advisory locks of four classes (two-key locks: ``objsubid`` 2) that other
#: sessions hold in this database.
LOCKS: Final = """
SELECT pid, classid::bigint, objid::bigint
FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND pid <> pg_backend_pid()
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid::bigint IN (%s, %s, %s, %s)
"""
#: The server's clock in milliseconds, modulo a number: a ticket's stamp.
SERVER_TICKS: Final = "SELECT mod((extract(epoch FROM clock_timestamp()) * 1000)::bigint, %s)"
#: The live client connections a limit counts: the server's, a role's, a database's.
LIVE_CLIENTS: Final = f"SELECT count(*) FROM pg_stat_activity WHERE {OTHER_CLIENTS}"
LIVE_BY_SCOPE: Final[Mapping[str, str]] = {
    ROLE: LIVE_CLIENTS + " AND usename = %s",
    DATABASE: LIVE_CLIENTS + " AND datname = %s",
}
#: Seconds since each of some sessions last finished a query (a run's coordinating
#: connection does every step); NULL for a session of a role this one may not watch.
SILENT: Final = """
SELECT pid, extract(epoch FROM now() - state_change)::float8
FROM pg_stat_activity WHERE pid = ANY(%s)
"""
TRY_LOCK: Final = "SELECT pg_try_advisory_lock(%s, %s)"
UNLOCK: Final = "SELECT pg_advisory_unlock(%s, %s)"
LOCK_SHARED: Final = "SELECT pg_advisory_lock_shared(%s, %s)"
UNLOCK_SHARED: Final = "SELECT pg_advisory_unlock_shared(%s, %s)"


def advisory_locks(conn: Any, classes: tuple[int, int, int, int]) -> list[tuple[int, int, int]]:
    """(pid, class, key) of every lock of ``classes`` other sessions hold."""
    return [
        (int(pid), int(cls), int(obj)) for pid, cls, obj in conn.execute(LOCKS, classes).fetchall()
    ]


def server_ticks(conn: Any, modulus: int) -> int:
    """The server's clock in milliseconds, modulo ``modulus``: one clock for every run
    that shares the server, wherever each runs."""
    row = conn.execute(SERVER_TICKS, (modulus,)).fetchone()
    return int(row[0])


def live_clients(conn: Any, scope: str, name: str) -> int:
    """Client connections, this one left out, within the limit of ``scope``: the
    server's, or those of the role or the database ``name``."""
    query, params = (
        (LIVE_BY_SCOPE[scope], (name,)) if scope in LIVE_BY_SCOPE else (LIVE_CLIENTS, ())
    )
    row = conn.execute(query, params).fetchone()
    return int(row[0]) if row else 0


def silent_for(conn: Any, pids: list[int]) -> dict[int, float]:
    """Seconds since each of the sessions ``pids`` last finished a query, for those this
    connection's role may watch (a session gone, or hidden, is left out)."""
    rows = conn.execute(SILENT, (pids,)).fetchall()
    return {int(pid): float(seconds) for pid, seconds in rows if seconds is not None}


def try_lock(conn: Any, lock_class: int, key: int) -> bool:
    """Take the exclusive lock (class, key) if nobody holds it; whether it was taken."""
    row = conn.execute(TRY_LOCK, (lock_class, key)).fetchone()
    return bool(row and row[0])


def unlock(conn: Any, lock_class: int, key: int) -> None:
    conn.execute(UNLOCK, (lock_class, key))


def lock_shared(conn: Any, lock_class: int, key: int) -> None:
    conn.execute(LOCK_SHARED, (lock_class, key))


def unlock_shared(conn: Any, lock_class: int, key: int) -> None:
    conn.execute(UNLOCK_SHARED, (lock_class, key))
