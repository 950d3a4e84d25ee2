"""What the drivers' ``login`` readers share: libpq's view of a connection, and the
address of a Unix-domain socket file.

The login is read from the open connection, after the driver resolved every default
(environment, service file, ``.pgpass``), so it is what the server accepted
(``worker/login.py`` says what it is for).
"""

from __future__ import annotations

import os
from typing import Any, Final

from pytest_poolaware.shared.protocol import ServerSeen

#: PostgreSQL's port when a driver does not say.
DEFAULT_PORT: Final = 5432
#: The name of a Unix-domain socket file: ``.s.PGSQL.<port>`` in the socket directory.
_SOCKET_PREFIX: Final = ".s.PGSQL."


def from_libpq(info: Any, driver: str) -> ServerSeen:
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


def server_address(addr: Any) -> tuple[str, int] | None:
    """``(host, port)`` of a peer address: a TCP address tuple (IPv4 or IPv6), or a socket
    file's path (its directory is libpq's host); None for anything else."""
    if isinstance(addr, tuple):
        return str(addr[0]), int(addr[1])
    directory, name = os.path.split(str(addr))
    if not name.startswith(_SOCKET_PREFIX):
        return None
    return directory, int(name[len(_SOCKET_PREFIX) :])


def text(value: Any) -> str:
    """A name a driver keeps as bytes (pg8000) or str."""
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
