"""pytest entry point: options, markers, and the wiring of ``--dist poolaware``."""

from __future__ import annotations

import atexit
import dataclasses
import gc
import os
import queue
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_poolaware.planning import priority
from pytest_poolaware.planning.history import CACHE_DIR, History
from pytest_poolaware.reporting import report
from pytest_poolaware.server import login_rooms
from pytest_poolaware.shared import compat
from pytest_poolaware.shared.clock import wall
from pytest_poolaware.shared.link import WORKERINPUT_KEY, ControllerLink, WorkerLink
from pytest_poolaware.shared.markers import PARALLEL_MARKER, SERIAL_MARKER, conflict_message
from pytest_poolaware.shared.protocol import ProtocolError, WorkerMessage, WorkerSettings
from pytest_poolaware.shared.settings import DIST_MODE, ConfigError, Settings, add_options

if TYPE_CHECKING:  # imported when used: xdist and psycopg only where the run needs them
    import execnet
    from xdist.remote import Producer
    from xdist.workermanage import WorkerController

    from pytest_poolaware.reporting.runstats import RunStats
    from pytest_poolaware.scheduler import PoolAwareScheduling
    from pytest_poolaware.server.discovery import Discovery
    from pytest_poolaware.server.learning import ServerLearning
    from pytest_poolaware.server.monitor import ServerMonitor
    from pytest_poolaware.server.room import ServerFacts
    from pytest_poolaware.server.share import ShareCoordinator
    from pytest_poolaware.shared.protocol import ServerSeen
    from pytest_poolaware.worker.meter import PoolMeter

#: Settings the workers need, sent with ``workerinput`` beside the side channel.
WORKER_SETTINGS_KEY = "poolaware_settings"
#: pytest cache key: the budget the last run learned from the server when no DSN was given
#: (a stand-in until this run learns it again; never the server's address or password).
LEARNED_BUDGET_KEY = "poolaware/learned_budget"
#: Packages newer than the tested range, one line each for the report header.
_version_warnings_key = pytest.StashKey[tuple[str, ...]]()
#: A worker's meter, counting from before its conftests are imported (``_count_early``).
_early_meter_key: pytest.StashKey[PoolMeter] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    add_options(parser)
    pluginmanager.register(_DistChoice(parser), "poolaware-dist-choice")


class _DistChoice:
    """Adds ``poolaware`` to xdist's ``--dist`` choices, whichever plugin loads first.

    xdist fixes the choices in argparse (pytest-xdist issue #970); an installed plugin
    runs before the command line is parsed, so it can still add a value.
    """

    def __init__(self, parser: pytest.Parser) -> None:
        self.parser = parser

    def pytest_plugin_registered(self, plugin: object, manager: pytest.PytestPluginManager) -> None:
        if getattr(plugin, "__name__", None) != "xdist.plugin":
            return
        compat.add_dist_choice(
            self.parser,
            DIST_MODE,
            f"{DIST_MODE}: serial_only tests one at a time on one worker, "
            "the rest fanned out, all within a PostgreSQL connection budget "
            "(pytest-poolaware).",
        )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """A worker of a poolaware run lowers its priority, and starts counting connections,
    before its conftests' imports."""
    priority.lower_priority(priority.take_in_worker())
    _count_early(early_config)


def _count_early(early_config: pytest.Config) -> None:
    """Hook the drivers before a worker's conftests are imported: a conftest may connect
    at import time, before ``config.workerinput`` (and so the side channel) exists.
    Those connections are counted, not gated; the worker's agent takes the meter over
    (``PoolMeter.bind``) and reports them as opened at start-up. A worker still has
    ``--dist`` on its command line here (xdist resets it afterwards)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    if getattr(early_config.known_args_namespace, "dist", None) != DIST_MODE:
        return
    from pytest_poolaware.worker.meter import PoolMeter

    meter = PoolMeter.unbound()
    meter.install()
    early_config.stash[_early_meter_key] = meter


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{SERIAL_MARKER}: runs alone in the serial lane, one at a time, in collection order "
        "(pytest-poolaware).",
    )
    config.addinivalue_line(
        "markers",
        f"{PARALLEL_MARKER}: may run beside other tests on any worker (pytest-poolaware).",
    )
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None:
        if WORKERINPUT_KEY in workerinput:
            _configure_worker(config, workerinput)
        elif _early_meter_key in config.stash:  # not a worker of ours after all
            config.stash[_early_meter_key].uninstall()
        return
    if config.getoption("dist", "no") != DIST_MODE:
        return
    config.stash[_version_warnings_key] = tuple(compat.check_versions())
    try:
        settings = Settings.from_config(config)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    if settings.fast_exit:
        exit_without_final_collections()
    if config.getoption("tx", None):
        config.pluginmanager.register(Controller(config, settings), "poolaware-controller")


def pytest_report_header(config: pytest.Config) -> list[str]:
    warnings: tuple[str, ...] = config.stash.get(_version_warnings_key, ())
    lines = list(warnings)
    if config.getoption("dist", "no") == DIST_MODE and not config.getoption("tx", None):
        lines.append("poolaware: no workers (-n/--tx): tests run in this process, one at a time")
    return lines


def exit_without_final_collections() -> None:
    """Freeze the heap at exit, so the interpreter's final garbage collections skip it.

    Once the last hook has run nothing needs collecting (the OS takes the memory back),
    yet those collections are most of a process's exit: about a quarter of a second for
    one that imported SQLAlchemy and its drivers, and the controller waits for every
    worker's. The cost: ``__del__`` of objects in reference cycles still alive at exit
    does not run, which Python never promised (``poolaware_fast_exit = false``).
    """
    atexit.unregister(gc.freeze)  # once per process, however many runs it hosts
    atexit.register(gc.freeze)


def _configure_worker(config: pytest.Config, workerinput: dict[str, Any]) -> None:
    from pytest_poolaware.worker.agent import WorkerAgent

    try:
        options = WorkerSettings.from_wire(workerinput[WORKER_SETTINGS_KEY])
    except ProtocolError as exc:
        raise pytest.UsageError(str(exc)) from None
    if options.fast_exit:
        exit_without_final_collections()
    agent = WorkerAgent(
        WorkerLink(workerinput[WORKERINPUT_KEY]),
        budget=options.budget,
        gate_timeout=options.gate_timeout,
        retry_on_limit=options.retry_on_limit,
        room=options.room,
        learn=options.learn,
        meter=config.stash.get(_early_meter_key, None),
    )
    config.pluginmanager.register(agent, "poolaware-worker")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Both markers on one test contradict each other: refuse to guess (in-process runs;
    under xdist the workers report it and the controller refuses)."""
    if config.getoption("dist", "no") != DIST_MODE or hasattr(config, "workerinput"):
        return
    from pytest_poolaware.worker.agent import item_markers

    both = [item.nodeid for item in items if item_markers(item).both]
    if both:
        raise pytest.UsageError(conflict_message(both))


class Controller:
    """xdist-only hooks of the controller, registered only for ``--dist poolaware`` runs
    with workers (so ``-p no:xdist`` never sees an xdist hook)."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        cache: pytest.Cache | None = getattr(config, "cache", None)  # None: -p no:cacheprovider
        self.cache = cache
        self.history = History.load(cache.mkdir(CACHE_DIR)) if cache is not None else History()
        self.links: dict[WorkerController, ControllerLink[WorkerController]] = {}
        self.inbox: queue.SimpleQueue[tuple[WorkerController, WorkerMessage]] = queue.SimpleQueue()
        self.scheduler: PoolAwareScheduling | None = None
        # For the report: session times, outcomes, server monitoring, the run's facts.
        self.started = self.finished = wall()
        self.outcomes: dict[str, str] = {}
        self.monitor: ServerMonitor | None = None
        #: The plugin's own server connection (discovery, monitoring), if any.
        self.server_connection: Any = None
        #: A pooler stands between the plugin and the server (``server_room.behind_pooler``).
        self.pooled = False
        #: This run's share of the server's room, when it shares it with other runs.
        self.share: ShareCoordinator | None = None
        #: When the budget is the server's room: what it allows the login, and which
        #: limit (a test needing more than that fails with a clear message).
        self.room: tuple[int, str] | None = None
        #: Notes and warnings of the controller's own (discovery, sharing) for the report.
        self.notes: list[str] = []
        self.warnings: list[str] = []
        #: With no DSN given: the server learned from the workers' first connection.
        self.learning: ServerLearning[WorkerController] | None = None
        #: The settings before a stand-in budget was chosen to learn the server.
        self._unlearned = settings
        #: Whether the budget was learned from the server (no DSN given).
        self.learned_room = False
        #: The budget as the first login's room set it, before any other login's (see
        #: ``_bind_tightest``).
        self.first_login: login_rooms.FirstLogin | None = None
        #: Other logins of the run's tests on the learned server, in the order read: what
        #: the server said of each, and their rooms as last counted.
        self.other_logins = login_rooms.OtherLogins()
        #: Other logins whose limits could not be read (notes).
        self.login_notes: list[str] = []
        self.stats: RunStats | None = None
        self.files: list[str] = []
        #: Workers xdist has yet to spawn, and the first one's gateway id (see ``priority``).
        self.spawning = 0
        self.serial_worker: str | None = None

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Runs before xdist starts the workers (its hook is trylast), so the plugin's own
        connection is made, and the budget chosen, before any of theirs."""
        self.started = wall()
        if self.settings.monitor_dsn:
            self._discover()
        elif not self.settings.monitor_source:  # not turned off: learn it from the tests
            self._start_learning()

    def _discover(self) -> None:
        """Set the budget from what the server allows, then monitor on the same connection."""
        from pytest_poolaware.server.discovery import discover

        settings = self.settings
        found = discover(settings.monitor_dsn, settings.configured_budget, settings.monitor_source)
        self._adopt(found, settings.monitor_dsn, settings.monitor_source)

    def _start_learning(self) -> None:
        """No DSN: hold the run to one connection at a time until the workers' first
        connection says where the server is (``learning``). Tests start meanwhile within
        what the last run learned, when that is smaller than the configured budget."""
        import importlib.util

        # Looked up, not imported: a run that never connects should not pay for it.
        if importlib.util.find_spec("psycopg") is None:
            self.notes.append(
                "the budget was not checked against the server: reading it needs psycopg "
                "on the controller (pip install psycopg)"
            )
            return
        from pytest_poolaware.server.learning import REMEMBERED, ServerLearning

        self.learning = ServerLearning(
            self.settings.configured_budget,
            self.inbox,
            self._wake_scheduler,
            self._learned,
            read_login=self._read_login,
            on_login=self._login_read,
        )
        self._unlearned = self.settings
        remembered = self.cache.get(LEARNED_BUDGET_KEY, None) if self.cache is not None else None
        if isinstance(remembered, dict):
            budget, source = remembered.get("budget"), remembered.get("source")
            if isinstance(budget, int) and 1 <= budget < self.settings.budget and source:
                self.settings = dataclasses.replace(
                    self.settings, budget=budget, budget_source=f"{source}, {REMEMBERED}"
                )

    def _remember_learned(self) -> None:
        """The budget learned from the server, as the next run's stand-in."""
        if self.cache is not None and self.learning is not None and self.learned_room:
            source = self.settings.budget_source
            self.cache.set(LEARNED_BUDGET_KEY, {"budget": self.settings.budget, "source": source})

    def _learned(self, found: Discovery, dsn: str, login: ServerSeen | None) -> int:
        """The server was read (or could not be): the run's budget from now on. Runs on
        the controller's main thread (``ServerLearning.take``)."""
        from pytest_poolaware.server.learning import LEARNED_ORIGIN

        unlearned = self._unlearned
        if found.choice is not None:  # else the stand-in stays: nothing better is known
            self.settings = dataclasses.replace(
                self.settings, budget=unlearned.budget, budget_source=unlearned.budget_source
            )
        self._adopt(found, dsn, LEARNED_ORIGIN)
        self.first_login = login_rooms.FirstLogin(
            self.settings.budget, self.settings.budget_source, self.room, self._budget_warning()
        )
        self.learned_room = found.room is not None and found.choice is not None
        if self.scheduler is not None and self.share is not None:
            self.scheduler.follow_share(self.share)
        return self._announce_budget()

    def _announce_budget(self) -> int:
        """The budget changed mid-run: tell the workers (``RoomKnown``) and return what the
        planner follows now."""
        from pytest_poolaware.shared.protocol import RoomKnown

        allows, limit = self.room if self.room is not None else (None, "")
        for link in self.links.values():
            link.send(RoomKnown(self.settings.budget, allows, limit))
        return self.share.budget() if self.share is not None else self.settings.budget

    def _read_login(self, login: ServerSeen, runs: Collection[int]) -> ServerFacts:
        """What the server allows another login of the run's tests, read on the plugin's
        own connection (in a thread of ``learning``'s): no second connection is opened."""
        from pytest_poolaware.server.discovery import read_facts

        connection = self.server_connection
        if connection is None:
            raise LookupError("the plugin has no connection of its own to the server")
        return read_facts(connection, login.dbname, runs, role=login.user)

    def _login_read(
        self, login: ServerSeen, read: ServerFacts | str, runs: Collection[int]
    ) -> int | None:
        """Another login on the learned server was read (``read``: its facts, or why they
        could not be): the run's budget becomes the tightest room among the logins read,
        since every connection the run opens counts against that one budget. Runs on the
        controller's main thread (``ServerLearning.take``)."""
        where = login.where()
        if isinstance(read, str):
            self.login_notes.append(
                f"tests also connected as {where}: what the server allows that login could "
                f"not be read ({read}); the budget leaves it out"
            )
            return None
        if self.monitor is not None:
            self.monitor.add_login(read.role, read.superuser)
        run_open = self.scheduler.planner.statistics().open if self.scheduler is not None else 0
        self.other_logins.add(where, read, run_open)
        return self._bind_tightest(runs)

    def _bind_tightest(self, runs: Collection[int]) -> int | None:
        """The budget from every login read, each counted again with the run's backends
        known by now (``runs``): a worker's connection the server listed before its worker
        said so was counted as another client's when its login was read, and is the run's
        own. The budget may rise back (never above the first login's) once it is."""
        from pytest_poolaware.server.room import CONFIGURED_TOO_LARGE

        first = self.first_login
        if first is None:
            return None
        tightest = self.other_logins.bind(self._unlearned.configured_budget, runs)
        budget, source, room, warning = first.budget, first.source, first.room, first.warning
        if tightest is not None and tightest.choice.budget < first.budget:
            choice = tightest.choice
            budget = choice.budget
            source = (
                f"{choice.source}; {tightest.where} binds, the tightest of "
                f"{self.other_logins.count + 1} logins"
            )
            room = None if choice.no_room else (tightest.room.allows, tightest.room.limit)
            warning = choice.warning
        # One warning of a configured budget too large: the binding login's.
        self.warnings = [w for w in self.warnings if not w.startswith(CONFIGURED_TOO_LARGE)]
        self.warnings += [warning] if warning else []
        changed = budget != self.settings.budget
        self.settings = dataclasses.replace(self.settings, budget=budget, budget_source=source)
        if not changed:
            return None
        self.room = room
        if self.share is not None:
            self.share.cap(budget)
        return self._announce_budget()

    def _budget_warning(self) -> str | None:
        from pytest_poolaware.server.room import CONFIGURED_TOO_LARGE

        return next((w for w in self.warnings if w.startswith(CONFIGURED_TOO_LARGE)), None)

    def _adopt(self, found: Discovery, dsn: str, origin: str) -> None:
        """The budget from what the server allows; sharing and monitoring on the plugin's
        connection."""
        from pytest_poolaware.server.monitor import ServerMonitor

        settings = self.settings
        self.notes.extend(found.notes)
        if found.choice is not None:
            self.settings = dataclasses.replace(
                settings, budget=found.choice.budget, budget_source=found.choice.source
            )
            if found.room is not None and found.choice.budget >= found.room.budget:
                self.room = (found.room.allows, found.room.limit)
            sharing = found.connection is not None and settings.share != "off" and not found.pooled
            if found.choice.warning and not sharing:  # else the share's own, just below
                self.warnings.append(found.choice.warning)
        self.server_connection = found.connection
        # Behind a pooler the server never lists the workers' backends: its list must
        # not uncount their connections.
        self.pooled = found.pooled
        if found.connection is not None and settings.share != "off":
            self._share(found, settings.configured_budget)
        if found.connection is not None:
            self.monitor = ServerMonitor(
                dsn, budget=self.settings.budget, source=origin, connection=found.connection
            )
            self.monitor.start()

    def _share(self, found: Any, configured: tuple[int, str] | None) -> None:
        """Share the room with the other runs of the name space: the budget is then the
        room as if this run were alone, and the run's share of it moves with the others."""
        from pytest_poolaware.server.room import choose_budget, room_of
        from pytest_poolaware.server.share import ShareCoordinator, share_growth_wait

        if found.pooled:
            self.notes.append(
                "sharing the server's room with other runs is off: a pooler (pgbouncer) "
                "stands between the plugin and the server, and session-level advisory "
                "locks do not hold there (point the DSN at the server itself to share)"
            )
            return

        alone = room_of(
            dataclasses.replace(found.facts, others_server=0, others_role=0, others_database=0)
        )
        ceiling = choose_budget(configured, alone)
        if ceiling.no_room:
            return
        if ceiling.warning:
            self.warnings.append(ceiling.warning)
        self.room = (alone.allows, alone.limit) if ceiling.budget >= alone.budget else None
        settings = self.settings
        self.settings = dataclasses.replace(
            settings, budget=ceiling.budget, budget_source=ceiling.source
        )
        self.share = ShareCoordinator(
            found.connection,
            namespace=settings.share_namespace,
            facts=found.facts,
            room=alone,
            ceiling=ceiling.budget,
            on_change=self._wake_scheduler,
            growth_wait=share_growth_wait(settings.gate_timeout),
        )
        self.share.start()

    def _wake_scheduler(self) -> None:
        """Called from the sharing thread when the run's share moved."""
        for node in list(self.links):
            compat.wake_controller(node)
            return

    def _stop_sharing(self) -> None:
        share, self.share = self.share, None
        if share is not None:
            share.stop()
            summary = share.summary()
            if summary:
                self.notes.append(summary)
            if share.problem:
                self.notes.append(share.problem)

    def pytest_xdist_setupnodes(self, specs: list[execnet.XSpec]) -> None:
        """xdist is about to spawn the workers, one after the other."""
        self.spawning = len(specs)

    def pytest_xdist_newgateway(self, gateway: execnet.Gateway) -> None:
        """The first worker spawned keeps its priority and will hold the serial lane; the
        ones spawned after it inherit the niceness offer (replacements run as they are)."""
        if self.serial_worker is None:
            self.serial_worker = gateway.id
        self.spawning -= 1
        if self.spawning > 0:
            priority.offer_to_workers(self.settings.fanout_nice)
        else:
            priority.withdraw()

    def pytest_configure_node(self, node: WorkerController) -> None:
        channel = node.gateway.newchannel()
        node.workerinput[WORKERINPUT_KEY] = channel
        node.workerinput[WORKER_SETTINGS_KEY] = WorkerSettings(
            budget=self.settings.budget,
            gate_timeout=self.settings.gate_timeout,
            retry_on_limit=self.settings.retry_on_limit,
            fast_exit=self.settings.fast_exit,
            room=self.room,
            learn=self.learning is not None and self.learning.pending,
        ).to_wire()
        self.links[node] = ControllerLink(channel, node, self.inbox, compat.wake_controller)

    def pytest_xdist_make_scheduler(
        self, config: pytest.Config, log: Producer
    ) -> PoolAwareScheduling:
        from pytest_poolaware.scheduler import PoolAwareScheduling

        self.scheduler = PoolAwareScheduling(
            config,
            log,
            settings=self.settings,
            history=self.history,
            links=self.links,
            inbox=self.inbox,
            serial_worker=self.serial_worker,
            server_pids=self._server_pids,
            share=self.share,
            learning=self.learning,
        )
        return self.scheduler

    def _server_pids(self) -> tuple[float, frozenset[int]] | None:
        monitor = self.monitor
        return None if monitor is None or self.pooled else monitor.pids_now()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Called three times per test: keep it lean.
        data = report.__dict__.get("poolaware")
        if data is not None and self.scheduler is not None:
            origin = compat.report_origin(report)
            if origin is not None:
                self.scheduler.note_measures(*origin, data)
        outcome = report.outcome
        when = report.when
        if outcome == "failed":
            self.outcomes[report.nodeid] = "failed" if when == "call" else "error"
        elif when == "call" or (when == "setup" and outcome == "skipped"):
            self.outcomes.setdefault(report.nodeid, outcome)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.finished = wall()
        priority.withdraw()
        if self.learning is not None:
            self.notes.extend(
                [*self.learning.notes(), *self.other_logins.notes(), *self.login_notes]
            )
            self._remember_learned()
        self._stop_sharing()
        server = self.monitor.stop() if self.monitor is not None else None
        self._close_server_connection()
        scheduler = self.scheduler
        if scheduler is None:
            return
        if exitstatus != pytest.ExitCode.INTERRUPTED and not session.shouldfail:
            report.not_run(self.config, session, scheduler.unfinished())
        if self.cache is not None and scheduler.collection:
            self.history.save(self.cache.mkdir(CACHE_DIR), keep=scheduler.collection)
        if scheduler.collection:
            scheduler.take_last_news()
            scheduler.keep_within(self.started, self.finished)
            self._note_fewer_slots_than_workers()
            problem = self.monitor.problem if self.monitor is not None else None
            self.stats = report.collect(
                settings=self.settings,
                snapshot=scheduler.snapshot(),
                started=self.started,
                finished=self.finished,
                outcomes=self.outcomes,
                server=server,
                notes=[*self.notes, *([problem] if problem else [])],
                warnings=self.warnings,
            )
            self.files = report.write_files(
                self.stats,
                self.settings,
                root=self.config.rootpath,
                invocation_dir=Path(self.config.invocation_params.dir),
            )

    def _note_fewer_slots_than_workers(self) -> None:
        """Say once that the budget ran fewer workers at once than were started: each
        worker that holds a connection (Django's persistent one, a pool's) takes a slot,
        so the others waited for one to give its idle connections back."""
        workers = len(self.config.getoption("tx", None) or ())
        budget = self.settings.budget
        if 0 < budget < workers:
            self.notes.append(
                f"the budget ({budget}) is smaller than the {workers} workers: at most "
                f"{budget} of them held connections at once, the others waiting for one "
                "to give its idle connections back"
            )

    def _close_server_connection(self) -> None:
        from pytest_poolaware.server.connection import close_quietly

        connection, self.server_connection = self.server_connection, None
        close_quietly(connection)

    def pytest_unconfigure(self) -> None:
        priority.withdraw()  # xdist may have failed to spawn the workers: no sessionfinish
        self._stop_sharing()
        self._close_server_connection()

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.stats is not None:
            report.write_summary(terminalreporter, self.stats, self.settings, self.files)
