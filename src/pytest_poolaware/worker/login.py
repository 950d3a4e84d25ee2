"""Worker side: the server and login a driver connection was opened with.

When no DSN is given, the run learns the server from the first connection a worker
opens: its host, port, database and user, and its password so that the controller can
open the plugin's own connection as the same login (``protocol.ServerSeen``). Read from
the open connection, after the driver resolved every default (environment, service
file, ``.pgpass``), so it is what the server accepted. asyncpg keeps them in private
attributes, listed in ``drivers.HOOKED_INTERNALS``.
"""

from __future__ import annotations

import os
from typing import Any, Final

from pytest_poolaware.shared.protocol import ServerSeen

#: PostgreSQL's port when a driver does not say.
DEFAULT_PORT: Final = 5432
#: The name of a Unix-domain socket file: ``.s.PGSQL.<port>`` in the socket directory.
_SOCKET_PREFIX: Final = ".s.PGSQL."


def login_of(conn: Any, driver: str) -> ServerSeen | None:
    """The server and login of a freshly opened connection; None when the driver does not
    say (a driver version with other internals: the run then keeps its budget)."""
    try:
        if driver in ("psycopg", "psycopg2"):
            return _from_libpq(conn.info, driver)
        if driver == "asyncpg":
            return _from_asyncpg(conn)
    except Exception:  # only a lookup: the test's connection is fine either way
        return None
    return None


def _from_libpq(info: Any, driver: str) -> ServerSeen:
    """psycopg 3's and psycopg2's ``conn.info`` (libpq's own view of the connection)."""
    password = info.password
    return ServerSeen(
        host=str(info.host),
        port=int(info.port or DEFAULT_PORT),
        dbname=str(info.dbname),
        user=str(info.user),
        password=str(password) if password else None,
        driver=driver,
        pid=int(info.backend_pid),
    )


def _from_asyncpg(conn: Any) -> ServerSeen | None:
    """asyncpg: ``conn._addr`` (``(host, port)``, or a socket file's path) and
    ``conn._params`` (user, password, database)."""
    addr, params = conn._addr, conn._params
    if isinstance(addr, tuple):
        host, port = str(addr[0]), int(addr[1])
    else:
        directory, name = os.path.split(str(addr))
        if not name.startswith(_SOCKET_PREFIX):
            return None
        host, port = directory, int(name[len(_SOCKET_PREFIX) :])
    password = params.password
    return ServerSeen(
        host=host,
        port=port,
        dbname=str(params.database),
        user=str(params.user),
        # A callable password (asyncpg 0.28+) is the application's secret provider.
        password=password if isinstance(password, str) and password else None,
        driver="asyncpg",
        pid=int(conn.get_server_pid()),
    )
