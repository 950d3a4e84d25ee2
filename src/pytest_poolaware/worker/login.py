"""Worker side: the server and login a driver connection was opened with.

When no DSN is given, the run learns the server from the first connection a worker
opens: its host, port, database and user, and its password so that the controller can
open the plugin's own connection as the same login (``protocol.ServerSeen``). Read from
the open connection, after the driver resolved every default (environment, service
file, ``.pgpass``), so it is what the server accepted. How to read it is each driver's
own (``Driver.login``); where a driver keeps it in private attributes, they are listed
in its ``Driver.internals``.
"""

from __future__ import annotations

from typing import Any

from pytest_poolaware.shared.protocol import ServerSeen
from pytest_poolaware.worker.drivers import named


def login_of(conn: Any, driver: str) -> ServerSeen | None:
    """The server and login of a freshly opened connection; None when the driver does not
    say (a driver version with other internals: the run then keeps its budget)."""
    found = named(driver)
    if found is None:
        return None
    try:
        return found.login(conn)
    except Exception:  # only a lookup: the test's connection is fine either way
        return None
