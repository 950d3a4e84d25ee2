"""The plugin's own connection to the server, and what runs on it for one run.

One connection, never the tests': opened before any worker starts when a DSN is given
(``discover``), else once the workers' first connection says where the server is
(``learning``). On it the server's room is read (the first login's, then every other
login's the tests use), the room is shared with other runs (``share``) and the run's
connections are counted (``monitor``). What it finds about the room goes to the budget
owner (``budget.RunBudget``), which alone decides the budget; this module only opens,
reads, starts and stops.

Only here does the adapter import the server's connection, discovery, sharing and
monitoring (the budget owner imports the room arithmetic it weighs).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import queue
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from pytest_poolaware.server.connection import (
    close_quietly,
    connection_failure,
    libpq_dsn,
    login_of_dsn,
    open_connection,
)
from pytest_poolaware.server.discovery import Discovery, discover, read_facts
from pytest_poolaware.server.learning import (
    LEARNED_ORIGIN,
    ServerLearning,
    import_driver_ahead,
    same_server,
)
from pytest_poolaware.server.monitor import ServerMonitor
from pytest_poolaware.server.room import ServerFacts, room_of
from pytest_poolaware.server.share import ShareCoordinator, share_growth_wait, share_summary
from pytest_poolaware.shared.options import ENV_DSN
from pytest_poolaware.shared.protocol import ServerSeen, WorkerMessage
from pytest_poolaware.shared.server_view import ServerView
from pytest_poolaware.shared.settings import Settings

if TYPE_CHECKING:
    from xdist.workermanage import WorkerController

    from pytest_poolaware.budget import RunBudget


class OwnConnection:
    """The plugin's connection for one run: discovery or learning, sharing, monitoring.

    ``wake`` wakes the scheduler from another thread (the server learned, the share
    moved), so that the budget owner's ``poll`` takes the news in.
    """

    def __init__(
        self,
        settings: Settings,
        budget: RunBudget[WorkerController],
        *,
        inbox: queue.SimpleQueue[tuple[WorkerController, WorkerMessage]],
        wake: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.budget = budget
        self._inbox = inbox
        self._wake = wake
        #: The connection itself, once open (None: none, or not yet).
        self.connection: Any = None
        #: A pooler stands between the plugin and the server (``room.behind_pooler``):
        #: the server never lists the workers' backends there.
        self.pooled = False
        self.monitor: ServerMonitor | None = None
        #: This run's share of the server's room, when it shares it with other runs.
        self.share: ShareCoordinator | None = None
        #: Seconds other runs held this one back, once sharing stopped (None: none met).
        self.held_back_by_runs: float | None = None
        #: Notes of discovery and sharing for the report, in the order they came.
        self.notes: list[str] = []

    def open(self) -> bool:
        """At the session's start, before any worker: read the server with the DSN given,
        or get ready to learn it from the workers. True when it is to be learned (a
        stand-in budget may apply meanwhile)."""
        settings = self.settings
        if settings.monitor_dsn:
            found = discover(settings.monitor_dsn, self.budget.configured, settings.monitor_source)
            self._adopt(found, settings.monitor_dsn, settings.monitor_source)
            if settings.tests_dsn and found.connection is not None:
                self._read_tests_login(settings.monitor_dsn, settings.tests_dsn)
            return False
        if settings.monitor_source:  # turned off
            return False
        return self._start_learning()

    def _read_tests_login(self, monitor_dsn: str, tests_dsn: str) -> None:
        """The plugin's connection is another login than the tests' (``poolaware_monitor``
        given beside ``$POOLAWARE_DSN``): the tests' login's room is read too, before any
        worker starts, and the tighter of the two rooms binds. The plugin's connection then
        takes none of the tests' role's slots."""
        monitor, tests = login_of_dsn(monitor_dsn), login_of_dsn(tests_dsn)
        if tests.key == monitor.key:
            return
        self.budget.learned(room_read=False)
        if not same_server(tests, monitor):
            self.notes.append(
                f"${ENV_DSN} names another server than the plugin's connection "
                f"({tests.host or 'a local socket'}:{tests.port}): what it allows the tests' "
                "login was not read"
            )
            return
        try:
            read: ServerFacts | str = self._read_login(tests, ())
        except Exception as exc:  # a note, never an error: the budget stays the monitor's
            read = connection_failure(self.connection, exc)
        self._login_read(tests, read, ())

    def _start_learning(self) -> bool:
        """No DSN: the run is held to one connection at a time until the workers' first
        connection says where the server is (``learning``)."""
        # Looked up here; imported in a thread of its own while the workers start, so a
        # run that never connects does not wait for it either.
        if importlib.util.find_spec("psycopg") is None:
            self.notes.append(
                "the budget was not checked against the server: reading it needs psycopg "
                "on the controller (pip install psycopg)"
            )
            return False
        learning: ServerLearning[WorkerController] = ServerLearning(
            self.budget.configured,
            self._inbox,
            self._wake,
            self._learned,
            read_login=self._read_login,
            on_login=self._login_read,
        )
        self.budget.learn_with(learning)
        import_driver_ahead()  # a run that learns the server will read it soon
        return True

    def _learned(self, found: Discovery, dsn: str, login: ServerSeen | None) -> int:
        """The server was read (or could not be): adopt it. Runs on the controller's main
        thread (``ServerLearning.take``, from the budget owner's ``poll``)."""
        self._adopt(found, dsn, LEARNED_ORIGIN)
        self.budget.learned(room_read=found.room is not None and found.choice is not None)
        return self.budget.budget

    def _adopt(self, found: Discovery, dsn: str, origin: str) -> None:
        """The budget from what the server allows; sharing and monitoring on the
        connection found."""
        self.notes.extend(found.notes)
        sharing = found.connection is not None and self.settings.share != "off" and not found.pooled
        self.budget.discovered(found.choice, found.room, sharing=sharing)
        self.connection = found.connection
        self.pooled = found.pooled
        if found.connection is None:
            return
        if self.settings.share != "off":
            self._share(found, dsn)
        self.monitor = ServerMonitor(
            dsn, budget=self.budget.budget, source=origin, connection=found.connection
        )
        self.monitor.start()

    def _share(self, found: Discovery, dsn: str) -> None:
        """Share the room with the other runs of the name space (not behind a pooler)."""
        if found.pooled:
            self.notes.append(
                "sharing the server's room with other runs is off: a pooler (pgbouncer) "
                "stands between the plugin and the server, and session-level advisory "
                "locks do not hold there (point the DSN at the server itself to share)"
            )
            return
        assert found.facts is not None  # a connection was found: its facts were read
        facts = dataclasses.replace(found.facts, others_server=0, others_role=0, others_database=0)
        alone = room_of(facts)
        ceiling = self.budget.share_room(alone)
        if ceiling is None:
            return
        self.share = ShareCoordinator(
            found.connection,
            namespace=self.settings.share_namespace,
            facts=found.facts,
            room=alone,
            ceiling=ceiling,
            on_change=self._wake,
            growth_wait=share_growth_wait(self.settings.gate_timeout),
            workers=self.settings.workers,
            reconnect=lambda: open_connection(libpq_dsn(dsn)),
        )
        self.budget.take_share(self.share)
        self.share.start()

    def _read_login(self, login: ServerSeen, runs: Collection[int]) -> ServerFacts:
        """What the server allows another login of the run's tests, read on this
        connection (in a thread of ``learning``'s): no second connection is opened."""
        if self.connection is None:
            raise LookupError("the plugin has no connection of its own to the server")
        return read_facts(self.connection, login.dbname, runs, role=login.user)

    def _login_read(
        self, login: ServerSeen, read: ServerFacts | str, runs: Collection[int]
    ) -> int | None:
        """Another login was read: the monitor counts its connections too, and the budget
        owner weighs its room (and publishes any change itself)."""
        if self.monitor is not None and not isinstance(read, str):
            self.monitor.add_login(read.role, read.superuser)
        self.budget.login_read(login, read, runs)
        return None

    def pids_now(self) -> tuple[float, frozenset[int]] | None:
        """The server's backend pids now, when it lists the run's (not behind a pooler)."""
        monitor = self.monitor
        return None if monitor is None or self.pooled else monitor.pids_now()

    def stop_sharing(self) -> list[str]:
        """Stop sharing; how it went, for the notes (once)."""
        share, self.share = self.share, None
        if share is None:
            return []
        share.stop()
        if share.peers_seen:
            self.held_back_by_runs = share.held_back.seconds
        summary = share_summary(share)
        notes = (summary, *share.other_versions.values(), *share.interruptions, share.problem)
        return [note for note in notes if note]

    def stop_monitor(self) -> tuple[ServerView | None, str | None]:
        """What the monitor saw, and why it stopped early (if it did)."""
        if self.monitor is None:
            return None, None
        return self.monitor.stop(), self.monitor.problem

    def close(self) -> None:
        connection, self.connection = self.connection, None
        close_quietly(connection)
