"""Worker side: Django's own connections, given back between tests as a pool's idle ones.

Django keeps one connection per thread and database alias, open across tests
(``CONN_MAX_AGE``, or until a request ends, which never happens under tests). The
drivers' hooks count it as a plain connection, so it would stay "in use" for the whole
run and the room it takes would never come back. Here the test thread's Django
connections are found (``django.db.connections`` is per thread, so they are read on the
thread that runs the tests, when an item ends) and, when idle in Django's sense (no
atomic block, no transaction open on the server, not shared with another thread), they
count as idle and are closed when the controller asks for idle connections back. Django
reopens a closed connection on its next use.

Only the owning thread may close a Django connection. A release runs on that thread
(waiting for its go, at an item's end, at the session's end), or on the worker's
release thread while the test thread is parked in xdist's loop between items (the
worker holds its lock so no item starts meanwhile): that one closes through Django's
own thread-sharing switch (``inc_thread_sharing``), the API Django's live server uses
to hand a connection to another thread.

Nothing here imports Django: a process that never imported it pays one dict lookup.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, Final

#: The module whose presence says the process uses Django's database layer.
DJANGO_DB: Final = "django.db"
#: The server's transaction status of an idle connection (libpq's ``PQTRANS_IDLE``, as
#: psycopg 3's and psycopg2's ``conn.info.transaction_status`` report it).
TRANSACTION_IDLE: Final = 0


def idle_in_django(wrapper: Any) -> bool:
    """Whether Django's connection ``wrapper`` holds an open connection nobody is using:
    not inside an atomic block (a test's own transaction included), no transaction open
    on the server, and not shared with another thread (a live server's)."""
    raw = getattr(wrapper, "connection", None)
    if raw is None:
        return False
    if wrapper.in_atomic_block or wrapper.closed_in_transaction:
        return False
    if wrapper.allow_thread_sharing:
        return False
    try:
        status = raw.info.transaction_status
    except Exception:  # closed, broken, or a driver that does not say: leave it alone
        return False
    return int(status) == TRANSACTION_IDLE


def _initialized_wrappers() -> list[Any]:
    """This thread's Django connection wrappers that have been used (none are created)."""
    module = sys.modules.get(DJANGO_DB)
    connections = getattr(module, "connections", None)
    if connections is None:
        return []
    return list(connections.all(initialized_only=True))


class DjangoConnections:
    """The Django connections of the thread that runs the tests."""

    def __init__(self) -> None:
        #: The test thread's wrappers holding a connection, as last read there (replaced
        #: whole: the release thread reads it).
        self._wrappers: tuple[weakref.ref[Any], ...] = ()
        self._owner: int | None = None

    def read(self) -> list[tuple[Any, bool]]:
        """On the test thread: its Django connections open now, each with whether it is
        idle in Django's sense (``idle_in_django``)."""
        if DJANGO_DB not in sys.modules:
            return []
        wrappers = [w for w in _initialized_wrappers() if w.connection is not None]
        self._owner = threading.get_ident()
        self._wrappers = tuple(weakref.ref(w) for w in wrappers)
        return [(w.connection, idle_in_django(w)) for w in wrappers]

    def open_connections(self) -> list[Any]:
        """The driver connections of the wrappers last read (from any thread)."""
        found = []
        for ref in self._wrappers:
            wrapper = ref()
            raw = None if wrapper is None else wrapper.connection
            if raw is not None:
                found.append(raw)
        return found

    def close_idle(self, counted_idle: Callable[[Any], bool], *, parked: bool) -> int:
        """Close the test thread's Django connections that are idle in Django's sense and
        counted idle (``counted_idle``: not while a test runs). On the test thread, or
        elsewhere when ``parked`` (the test thread waits in xdist's loop and no item
        starts meanwhile); otherwise nothing. Returns how many were closed."""
        on_owner = self._owner is not None and threading.get_ident() == self._owner
        if not (on_owner or parked) or _in_event_loop():
            return 0  # Django refuses to close from a running event loop (async_unsafe)
        closed = 0
        for ref in self._wrappers:
            wrapper = ref()
            if wrapper is None or not idle_in_django(wrapper):
                continue
            if not counted_idle(wrapper.connection):
                continue
            if on_owner:
                wrapper.close()
            else:
                wrapper.inc_thread_sharing()
                try:
                    wrapper.close()
                finally:
                    wrapper.dec_thread_sharing()
            closed += 1
        return closed


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
