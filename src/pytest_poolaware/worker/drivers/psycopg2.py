"""psycopg2: ``psycopg2.connect()`` looks its C function up on the module at call time.

The connection type is C code, so its ``close()`` cannot be hooked: a close is seen at
the next sweep (``conn.closed``), and a connection SQLAlchemy closes is closed by the
meter and waited for (``close_hooked`` False).
"""

from __future__ import annotations

from typing import Any, Final

from pytest_poolaware.shared.protocol import ServerSeen
from pytest_poolaware.worker.drivers.base import Driver, Hook, HookedInternal, Hooking
from pytest_poolaware.worker.drivers.logins import from_libpq

INTERNALS: Final = (
    HookedInternal(
        "psycopg2-binary",
        "psycopg2._connect",
        "the C function psycopg2.connect() looks up on its module at call time; wrapped "
        "to pass the gate and count the connection",
    ),
)


def _closed(conn: Any) -> bool:
    return bool(conn.closed)


def _install(hooking: Hooking) -> None:
    import psycopg2

    connect = psycopg2._connect
    sink = hooking.sink

    def _connect(*args: Any, **kwargs: Any) -> Any:
        sink.gate(False)
        conn = connect(*args, **kwargs)
        if not conn.async_:  # an asynchronous connection has no backend until polled
            hooking.opened(conn)
        return conn

    hooking.patch(psycopg2, "_connect", _connect)


def _login(conn: Any) -> ServerSeen:
    return from_libpq(conn.info, PSYCOPG2.name)


PSYCOPG2: Final = Driver(
    name="psycopg2",
    hooks=(Hook("psycopg2", _install),),
    sqlalchemy=("psycopg2",),
    backend_pid=lambda conn: int(conn.get_backend_pid()),
    fileno=lambda conn: int(conn.fileno()),
    is_closed=_closed,
    close_hooked=False,
    login=_login,
    internals=INTERNALS,
)
