"""pytest entry point: options, markers, and the wiring of ``--dist poolaware``."""

from __future__ import annotations

import atexit
import gc
import os
import queue
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_poolaware.planning import priority
from pytest_poolaware.planning.history import CACHE_DIR, History
from pytest_poolaware.reporting import report
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

    from pytest_poolaware.budget import RunBudget
    from pytest_poolaware.reporting.runstats import RunStats
    from pytest_poolaware.scheduler import PoolAwareScheduling
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
        go_timeout=options.go_timeout,
        retry_on_limit=options.retry_on_limit,
        room=options.room,
        learn=options.learn,
        meter=config.stash.get(_early_meter_key, None),
    )
    config.pluginmanager.register(agent, "poolaware-worker")
    config.pluginmanager.register(agent.left_out, "poolaware-worker-left-out")


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


def load_history(settings: Settings, cache: pytest.Cache | None) -> History:
    """What earlier runs learned: the ``--poolaware-history`` file's entries first (the
    data a team chose to plan by, the same on every machine), pytest's cache for the
    tests the file lacks."""
    cached = History.load(cache.mkdir(CACHE_DIR)) if cache is not None else History()
    if settings.history_path is None:
        return cached
    path = Path(settings.history_path)
    shared = History.read(path)
    if not settings.store_history and not path.exists():
        shared.problems.append(
            f"{path} does not exist: no learned data read from it "
            "(--poolaware-store-history writes it)"
        )
    return shared.filled_from(cached)


def save_history(history: History, settings: Settings, cache: pytest.Cache | None) -> list[str]:
    """Keep what the run learned in pytest's cache, and in the ``--poolaware-history``
    file when asked to; notes for the summary on what could not be written."""
    if cache is not None:
        history.save(cache.mkdir(CACHE_DIR))
    if not (settings.store_history and settings.history_path):
        return []
    try:
        history.write(Path(settings.history_path))
    except OSError as exc:
        return [f"could not store the learned data in {settings.history_path}: {exc}"]
    return []


class Controller:
    """xdist-only hooks of the controller, registered only for ``--dist poolaware`` runs
    with workers (so ``-p no:xdist`` never sees an xdist hook).

    The budget is ``budget``'s (``RunBudget``): ``settings`` are the user's, read only.
    The plugin's own connection to the server (discovery, learning, sharing,
    monitoring) is ``server``'s.
    """

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        from pytest_poolaware.budget import RunBudget
        from pytest_poolaware.own_connection import OwnConnection

        self.config = config
        self.settings = settings
        cache: pytest.Cache | None = getattr(config, "cache", None)  # None: -p no:cacheprovider
        self.cache = cache
        self.history = load_history(settings, cache)
        self.links: dict[WorkerController, ControllerLink[WorkerController]] = {}
        self.inbox: queue.SimpleQueue[tuple[WorkerController, WorkerMessage]] = queue.SimpleQueue()
        self.scheduler: PoolAwareScheduling | None = None
        self.budget: RunBudget[WorkerController] = RunBudget.from_settings(settings)
        self.server = OwnConnection(
            settings, self.budget, inbox=self.inbox, wake=self._wake_scheduler
        )
        # For the report: session times, outcomes, the run's facts.
        self.started = self.finished = wall()
        self.outcomes: dict[str, str] = {}
        #: Notes of the controller's own (discovery, sharing, logins) for the report.
        self.notes: list[str] = []
        self.stats: RunStats | None = None
        self.files: list[str] = []
        #: Workers xdist has yet to spawn, and the first one's gateway id (see ``priority``).
        self.spawning = 0
        self.serial_worker: str | None = None

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Runs before xdist starts the workers (its hook is trylast), so the plugin's own
        connection is made, and the budget chosen, before any of theirs. With no DSN,
        tests start within what the last run learned, when that is smaller than the
        configured budget, until the server is learned again."""
        self.started = wall()
        if self.server.open() and self.cache is not None:
            self.budget.remember(self.cache.get(LEARNED_BUDGET_KEY, None))

    def _wake_scheduler(self) -> None:
        """Called from the learning and sharing threads when there is news."""
        for node in list(self.links):
            compat.wake_controller(node)
            return

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
        budget = self.budget.statistics()
        node.workerinput[WORKER_SETTINGS_KEY] = WorkerSettings(
            budget=budget.budget,
            gate_timeout=self.settings.gate_timeout,
            go_timeout=self.settings.go_timeout,
            retry_on_limit=self.settings.retry_on_limit,
            fast_exit=self.settings.fast_exit,
            room=budget.room,
            learn=budget.learning,
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
            budget=self.budget,
            history=self.history,
            links=self.links,
            inbox=self.inbox,
            serial_worker=self.serial_worker,
            server_pids=self.server.pids_now,
        )
        return self.scheduler

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
        self.notes = [*self.server.notes, *self.budget.notes()]
        learned = self.budget.to_remember()
        if self.cache is not None and learned is not None:
            self.cache.set(LEARNED_BUDGET_KEY, learned)
        self.notes += self.server.stop_sharing()
        server, problem = self.server.stop_monitor()
        self.server.close()
        scheduler = self.scheduler
        if scheduler is None:
            return
        if exitstatus != pytest.ExitCode.INTERRUPTED and not session.shouldfail:
            report.not_run(self.config, session, scheduler.unfinished())
        if scheduler.collection:
            self.notes += save_history(self.history, self.settings, self.cache)
            scheduler.take_last_news()
            scheduler.keep_within(self.started, self.finished)
            self._note_fewer_slots_than_workers()
            budget = self.budget.statistics()
            self.stats = report.collect(
                settings=self.settings,
                budget=(budget.budget, budget.source),
                snapshot=scheduler.snapshot(),
                started=self.started,
                finished=self.finished,
                outcomes=self.outcomes,
                server=server,
                notes=[*self.notes, *([problem] if problem else [])],
                warnings=self.budget.warnings,
                held_back_by_runs=self.server.held_back_by_runs,
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
        budget = self.budget.budget
        if 0 < budget < workers:
            self.notes.append(
                f"the budget ({budget}) is smaller than the {workers} workers: at most "
                f"{budget} of them held connections at once, the others waiting for one "
                "to give its idle connections back"
            )

    def pytest_unconfigure(self) -> None:
        priority.withdraw()  # xdist may have failed to spawn the workers: no sessionfinish
        self.server.stop_sharing()
        self.server.close()

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.stats is not None:
            report.write_summary(terminalreporter, self.stats, self.settings, self.files)
