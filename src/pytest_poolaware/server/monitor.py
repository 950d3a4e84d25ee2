"""Server-side view of a run: its connections counted in pg_stat_activity, in the background."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Final

from pytest_poolaware.server import sql
from pytest_poolaware.server.connection import (
    APPLICATION_NAME,
    CONNECT_TIMEOUT,
    close_quietly,
    connection_failure,
    libpq_dsn,
)
from pytest_poolaware.server.room import CLOSING_SLACK
from pytest_poolaware.shared.clock import wall
from pytest_poolaware.shared.dsn import APPLICATION_NAME_PREFIX, mask_dsn
from pytest_poolaware.shared.errors import first_line
from pytest_poolaware.shared.server_view import ServerView

#: Seconds between two samples: short enough to catch a test's burst of connections,
#: long enough that the sampler costs the server nothing noticeable.
SAMPLE_INTERVAL: Final = 0.05
#: Longest wait, at the end of the run, for connections the workers closed (or that
#: went with their processes) to leave the server, so the last sample says what is left.
END_SETTLE: Final = 1.0


class ServerMonitor:
    """Counts the run's connections in ``pg_stat_activity`` every ``interval`` seconds.

    It holds one connection of its own for the whole run, outside the budget; with a
    limited role that connection takes one of the role's slots, so it gives up (with a
    note) rather than take a slot the budget counts on. Any failure is a one-line
    ``problem``, never an exception: the run must not depend on its monitor.

    Given the plugin's own ``connection`` (whose slot the discovered budget already
    leaves free), it samples on that one and leaves closing it to its owner.
    """

    def __init__(
        self,
        dsn: str,
        *,
        budget: int,
        source: str = "",
        interval: float = SAMPLE_INTERVAL,
        clock: Callable[[], float] = wall,
        connection: Any = None,
    ) -> None:
        self.dsn = dsn
        self._shared = connection
        self.budget = budget
        self.source = source  # where the DSN came from, for the notes
        self.interval = interval
        self._clock = clock
        self.samples: list[tuple[float, int]] = []
        self.peak = 0
        self.scope = ""
        self.problem: str | None = None
        #: The latest sample's time and backend pids (replaced whole: read from any thread).
        self.latest: tuple[float, frozenset[int]] | None = None
        #: The sampler thread and ``pids_now`` share the connection.
        self._sampling = threading.Lock()
        self._conn: Any = None
        #: What each sample counts: the query and its parameters (replaced whole).
        self._query: tuple[str, tuple[Any, ...]] = ("", ())
        #: The roles counted by name, and whether tagged connections are counted (a
        #: superuser login among the run's).
        self._roles: list[str] = []
        self._tagged = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Connect and check the role (on the caller's thread, before any worker connects),
        then sample in a daemon thread."""
        try:
            import psycopg
        except ImportError:
            self.problem = "server monitoring off: it needs psycopg (pip install psycopg)"
            return
        where = mask_dsn(self.dsn)
        try:
            self._conn = self._shared or psycopg.connect(
                libpq_dsn(self.dsn),
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT,
                application_name=APPLICATION_NAME,
            )
            row = sql.current_role(self._conn)
        except Exception as exc:
            origin = f"DSN from {self.source}; " if self.source else ""
            self.problem = (
                f"server monitoring off: cannot use {where}: {first_line(exc)} "
                f"({origin}--poolaware-monitor=off turns monitoring off)"
            )
            self._close()
            return
        role, superuser, limit = row if row is not None else ("?", True, -1)
        if self._shared is None and not superuser and 0 <= limit <= self.budget + CLOSING_SLACK:
            self.problem = (
                f"server monitoring off: role {role} allows {limit} connections and the "
                f"budget is {self.budget}; the monitor's own would take one of them "
                "(point --poolaware-monitor at another role, e.g. a superuser's)"
            )
            self._close()
            return
        self._count(role, superuser)
        if self._sample():
            self._thread = threading.Thread(target=self._run, name="poolaware-monitor", daemon=True)
            self._thread.start()

    def add_login(self, role: str, superuser: bool) -> None:
        """The run's tests also connect as ``role``: count its connections too (the
        workers check their counts against the pids sampled, so a login left out would
        have its connections uncounted)."""
        with self._sampling:
            self._count(role, superuser)

    def _count(self, role: str, superuser: bool) -> None:
        """Count the connections of ``role`` too (a superuser's: the tagged ones)."""
        if superuser:
            self._tagged = True
        elif role not in self._roles:
            self._roles.append(role)
        tagged = f"{APPLICATION_NAME_PREFIX}%"
        names = ", ".join(self._roles)
        words = f"role{'s' if len(self._roles) > 1 else ''} {names}"
        if not self._roles:
            self._query = (sql.TAGGED_PIDS, (tagged,))
            self.scope = f"application_name {APPLICATION_NAME_PREFIX}*"
        elif not self._tagged and len(self._roles) == 1:
            self._query = (sql.ROLE_PIDS, (self._roles[0],))
            self.scope = words
        else:
            self._query = (sql.LOGINS_PIDS, (list(self._roles), self._tagged, tagged))
            tagged_words = f"application_name {APPLICATION_NAME_PREFIX}* and "
            self.scope = f"{tagged_words if self._tagged else ''}{words}"

    def stop(self) -> ServerView | None:
        """Take a last sample, close the connection; what was seen (None if nothing)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()
            self._settle()
        self._close()
        if not self.samples:
            return None
        return ServerView(
            self.peak, len(self.samples), self.scope, self.interval, tuple(self.samples)
        )

    def pids_now(self) -> tuple[float, frozenset[int]] | None:
        """A fresh sample's time and backend pids (when a gate wait begins, the workers
        check their counts against it); the latest one if sampling fails."""
        with self._sampling:
            self._sample()
        return self.latest

    def _settle(self) -> None:
        """Sample until the server holds none of the run's connections, for END_SETTLE
        at most: the server ends a backend a moment after its client went away."""
        deadline = self._clock() + END_SETTLE
        while self._sample() and self.samples[-1][1] > 0 and self._clock() < deadline:
            time.sleep(self.interval)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._sampling:
                if not self._sample():
                    return

    def _sample(self) -> bool:
        if self._conn is None:
            return False
        # Stamped before the query: the server's snapshot is taken after this moment, so
        # a connection a worker counted after it may be missing from the sample and must
        # not be taken for one the server ended (``PoolMeter.reconcile``).
        now = self._clock()
        try:
            pids = sql.backend_pids(self._conn, *self._query)
        except Exception as exc:
            self.problem = (
                f"server monitoring stopped after {len(self.samples)} samples: "
                f"{connection_failure(self._conn, exc)}"
            )
            self._close()
            return False
        self.latest = (now, pids)
        self.samples.append((now, len(pids)))
        self.peak = max(self.peak, len(pids))
        return True

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not self._shared:
            close_quietly(conn)
