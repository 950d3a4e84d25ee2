"""pg8000, pure Python: ``pg8000.dbapi``, ``pg8000.native`` and the legacy ``pg8000``.

All three connection classes derive from ``pg8000.core.CoreConnection``, whose
``__init__`` opens the socket, logs in and reads until the server is ready for a query,
and whose ``close()`` sends Terminate and closes the socket; none overrides either. So
the gate goes before ``__init__`` (pg8000 is synchronous: the connect waits there), the
count after it, and the close hook waits for the backend to exit. The backend pid is in
the BackendKeyData message pg8000 keeps whole; the socket is ``_usock``, None once closed.
"""

from __future__ import annotations

import functools
import inspect
import struct
from typing import Any, Final

from pytest_poolaware.shared.protocol import ServerSeen
from pytest_poolaware.worker.drivers.base import Driver, Hook, HookedInternal, Hooking
from pytest_poolaware.worker.drivers.logins import server_address, text

INTERNALS: Final = (
    HookedInternal(
        "pg8000",
        "core.CoreConnection.__init__",
        "the base of every connection class, which connects and logs in before it "
        "returns; wrapped to pass the gate before it and count the connection after it",
    ),
    HookedInternal(
        "pg8000",
        "core.CoreConnection.close",
        "the one close of every connection class; wrapped to wait for the backend's exit",
    ),
    HookedInternal(
        "pg8000",
        "CoreConnection._usock",
        "the connection's socket, None once closed: duplicated to see the backend exit, "
        "and read at a sweep to see a close",
    ),
    HookedInternal(
        "pg8000",
        "CoreConnection._backend_key_data",
        "the body of the server's BackendKeyData message: the backend pid, then the cancel key",
    ),
    HookedInternal(
        "pg8000",
        "CoreConnection.user, CoreConnection.password",
        "the login as sent (bytes), read by ``login`` with the socket's peer address "
        "and the database the connect asked for",
    ),
)

#: Where the wrapped ``__init__`` keeps the database a connection asked for (pg8000 does
#: not keep it; the server takes the user's name when none is given).
_DATABASE: Final = "_poolaware_database"
#: The backend pid: BackendKeyData's first field, a big-endian 32-bit integer.
_PID: Final = struct.Struct("!i")


def _install(hooking: Hooking) -> None:
    from pg8000.core import CoreConnection

    init = CoreConnection.__dict__["__init__"]
    signature = inspect.signature(init)
    sink, exits = hooking.sink, hooking.exits

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        sink.gate(False)
        init(self, *args, **kwargs)  # on failure it closes its socket, and raises
        called = signature.bind(self, *args, **kwargs).arguments
        self.__dict__[_DATABASE] = called.get("database") or called.get("user")
        hooking.opened(self)

    hooking.patch(CoreConnection, "__init__", __init__)

    close = CoreConnection.__dict__["close"]

    @functools.wraps(close)
    def _close(self: Any) -> None:
        try:
            close(self)
        finally:
            if self._usock is None:
                exits.closed_sync(self)

    hooking.patch(CoreConnection, "close", _close)


def _backend_pid(conn: Any) -> int:
    pid: int = _PID.unpack_from(conn._backend_key_data)[0]
    return pid


def _login(conn: Any) -> ServerSeen | None:
    """The socket's peer (an address, or the server's socket file), and the login sent."""
    address = server_address(conn._usock.getpeername())
    if address is None:
        return None
    password = conn.password
    return ServerSeen(
        host=address[0],
        port=address[1],
        dbname=text(conn.__dict__[_DATABASE]),
        user=text(conn.user),
        password=text(password) if password else None,
        driver=PG8000.name,
        pid=_backend_pid(conn),
    )


PG8000: Final = Driver(
    name="pg8000",
    hooks=(Hook("pg8000", _install),),
    sqlalchemy=("pg8000",),
    backend_pid=_backend_pid,
    fileno=lambda conn: int(conn._usock.fileno()),
    is_closed=lambda conn: conn._usock is None,
    close_hooked=True,
    login=_login,
    internals=INTERNALS,
)
