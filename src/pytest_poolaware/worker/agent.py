"""Worker side of ``--dist poolaware``: waits for the go, measures each test, reruns on limits."""

from __future__ import annotations

import gc
import sys
import threading
import warnings
from collections.abc import Callable, Generator, Iterator
from typing import Final, TypeVar

import pytest

from pytest_poolaware.shared.clock import monotonic, wall
from pytest_poolaware.shared.compat import run_test_protocol
from pytest_poolaware.shared.errors import error_chain, is_connection_limit_error
from pytest_poolaware.shared.link import WorkerLink
from pytest_poolaware.shared.markers import (
    GROUP_MARKER,
    PARALLEL_MARKER,
    SERIAL_MARKER,
    Markers,
    group_name,
    mark_group_name,
)
from pytest_poolaware.shared.protocol import (
    Answer,
    Collected,
    Counts,
    ItemMeasures,
    Note,
    OpenedOutsideTests,
    RoomKnown,
)
from pytest_poolaware.worker.login import login_of
from pytest_poolaware.worker.meter import (
    NO_ITEM,
    BudgetRefused,
    ControllerGone,
    PoolMeter,
    RoomTooSmall,
)

#: Why an item's attempt failed on connections: ``RERUN_DEADLOCK`` or ``RERUN_SERVER``.
_limit_hit_key = pytest.StashKey[str]()
RERUN_DEADLOCK = "gave way to break a wait for connections"
RERUN_SERVER = "the server refused a connection"
#: The attempt failed in the setup of a fixture broader than the test (session, module,
#: class) on a connection limit: a rerun would repeat that setup (pytest-django's
#: ``django_db_setup`` would create its databases again, under a name suffixed twice)
#: or fail on its cached error, for every test that uses it, so none is rerun.
NOT_RERUN_BROAD_SETUP = "in a broader fixture's setup"

#: Why a worker stops when its controller has gone.
ORPHANED: Final = (
    "the run's controller has gone; this worker opens no connection and starts no test"
)

#: Where a worker is when a connection is opened outside any test: a suite may connect in
#: ``pytest_configure``, at conftest import, in ``pytest_sessionstart`` (SQLAlchemy's own
#: suite provisions its databases there), during collection, or in
#: ``pytest_sessionfinish`` (dropping them). Such connects are counted and admitted like
#: a test's, but never refused: there is no test to rerun (``docs/design.md``,
#: "Connections outside tests").
STARTUP: Final = "start-up"
SESSION_START: Final = "session start"
COLLECTION: Final = "collection"
BETWEEN_TESTS: Final = "between tests"
SESSION_FINISH: Final = "session finish"

#: Waits for the budget shorter than this are counted but not kept as spans (the trace):
#: every item waits about one round trip to the controller for its go.
WAIT_SPAN_MIN: Final = 0.002

T = TypeVar("T")


def _drop_failed_attempt() -> None:
    """Let go of what a failed attempt still holds, so its connections return to the pool.

    Code that opens several connections rarely closes the ones it got when a later one
    fails; pytest keeps the failure's traceback (and so those connections) alive in
    ``sys.last_traceback``. Room for the rerun must not wait for a later collection.
    """
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    with warnings.catch_warnings():
        # SQLAlchemy warns when the collector returns a connection to its pool.
        warnings.simplefilter("ignore")
        gc.collect()


def item_markers(item: pytest.Item) -> Markers:
    """The plugin's markers and the ``xdist_group`` on one item, markers on classes and
    modules included (read here, never put in the node id: ``--lf`` and the learned data
    key on it)."""
    return Markers(
        serial=item.get_closest_marker(SERIAL_MARKER) is not None,
        parallel=item.get_closest_marker(PARALLEL_MARKER) is not None,
        xdist_group=group_name(
            mark_group_name(mark.args, mark.kwargs) for mark in item.iter_markers(GROUP_MARKER)
        ),
    )


class WorkerAgent:
    """Registered on each xdist worker of a ``--dist poolaware`` run.

    It owns the ``PoolMeter`` of the worker process, sends the items' markers to the
    controller after collection, holds each item until the controller's go, reports
    what each item measured, and reruns an item alone when the server refused it a
    connection (once, and only if the rerun is enabled).
    """

    def __init__(
        self,
        link: WorkerLink,
        *,
        budget: int,
        gate_timeout: float,
        retry_on_limit: bool,
        room: tuple[int, str] | None = None,
        learn: bool = False,
        clock: Callable[[], float] = monotonic,
        meter: PoolMeter | None = None,
    ) -> None:
        self.link = link
        #: When the budget is the server's own room: what the server allows the login in
        #: all, and which limit that is ("role acc_app CONNECTION LIMIT 16").
        self.room = room
        self.budget = budget
        self.gate_timeout = gate_timeout
        self.retry_on_limit = retry_on_limit
        self._clock = clock
        self._index: dict[pytest.Item, int] = {}
        self._waited = 0.0
        self._waits: list[tuple[float, float]] = []
        #: The item being run: connect requests name it, so the controller can tell them
        #: from the previous item's (its completion may reach the controller later).
        self._running = NO_ITEM
        #: Where the worker is when not running a test (None: inside one).
        self._phase: str | None = STARTUP
        #: Whether connects ask the controller: not once this worker's session has
        #: finished (the controller no longer answers a worker that has finished).
        self._gated = True
        self._learning = learn
        #: Failures of fixtures broader than a test on a connection limit (by ``id``).
        self._broad_failures: set[int] = set()
        #: What the connecting thread waited at the gate, for its ``OpenedOutsideTests``.
        self._connect = threading.local()
        #: Servers and logins already sent to the controller (``learn``).
        self._logins_sent: set[tuple[str, int, str, str]] = set()
        #: A meter counting since start-up (``PoolMeter.unbound``) is taken over.
        self.meter = meter if meter is not None else PoolMeter.unbound()
        counted_before = self.meter.bind(
            on_change=lambda open_, idle, released, version: self.link.send(
                Counts(open_, idle, released, version)
            ),
            gate=self._gate,
            gate_async=self._gate_async,
            on_error=self._report_error,
            on_opened=self._opened,
        )
        if counted_before:  # still open from before this agent existed: counts first
            self.meter.report(released=False)
        if learn:
            for conn, driver in counted_before:
                self._learn(conn, driver)
        for _driver in self.meter.opened_unbound:  # closed since, or not
            self.link.send(OpenedOutsideTests(STARTUP))
        link.on_server_pids = lambda sample: self.meter.reconcile(sample.pids, before=sample.taken)
        link.on_room_known = self._room_known
        link.on_release = self._release_when_waiting_for_work
        #: The main thread waits for work in xdist's own loop (between items), where it
        #: cannot hear a ``ReleaseIdle``: the release is then carried out on a thread of
        #: its own, under ``_between_items_lock`` so no item starts meanwhile.
        self._between_items = False
        self._between_items_lock = threading.Lock()

    # -- hooks ------------------------------------------------------------------------------

    def pytest_configure(self, config: pytest.Config) -> None:
        """Hook the drivers: those imported now, the others as they are imported."""
        self.meter.install()

    def _install_meter(self) -> None:
        """Instrument SQLAlchemy's pools once it is in use (conftests usually import it
        before this runs); a worker that never imports it does not pay for the import."""
        if not self.meter.installed and "sqlalchemy" in sys.modules:
            self.meter.install()

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.meter.uninstall()

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._phase = SESSION_START

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self, session: pytest.Session) -> None:
        self._phase = COLLECTION

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Send markers before xdist's own collectionfinish, so they arrive first."""
        self._phase = BETWEEN_TESTS
        self._install_meter()
        if self.meter.idle_django():  # opened at start-up or collection, idle now
            self.meter.report(released=False)
        self._index = {item: i for i, item in enumerate(session.items)}
        markers = tuple(item_markers(item) for item in session.items)
        conflicts = tuple(
            item.nodeid for item, m in zip(session.items, markers, strict=True) if m.both
        )
        self.link.send(Collected(markers, conflicts))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool:
        with self._between_items_lock:  # a release carried out meanwhile ends first
            self._between_items = False
        self._phase = None
        try:
            return self._run_item(item, nextitem)
        finally:
            self._phase = BETWEEN_TESTS
            with self._between_items_lock:
                self._between_items = True
            if self.link.release_asked:  # asked after the item's end took its asks
                self._release_when_waiting_for_work()

    def _run_item(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool:
        index = self._index[item]
        self._running = index
        self._install_meter()
        self._waited = 0.0
        self._waits = []
        if not self._timed_wait(lambda: self.link.wait_go(index, on_release=self._release)):
            # The controller has gone (its run was killed): nobody coordinates this
            # worker's connections any more. Start nothing, give the idle ones back.
            self._release()
            item.session.shouldstop = ORPHANED
            return True
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        started = wall()
        start = self._clock()
        self.meter.begin(index)
        reports = run_test_protocol(item, nextitem)
        window = self.meter.end()
        # The server refused a connection: what the meter counted may include connections
        # the failed attempt's threads still held while the test (or its rerun) went on.
        contended = item.stash.get(_limit_hit_key, "") == RERUN_SERVER
        retry = self.retry_on_limit and not self.link.closed
        reason = item.stash.get(_limit_hit_key, "") if retry else ""
        if reason == NOT_RERUN_BROAD_SETUP:
            del item.stash[_limit_hit_key]
            reason = ""
        if reason:
            del item.stash[_limit_hit_key]
            _drop_failed_attempt()
            self._release()
            self._timed_wait(
                lambda: self.link.request(index, self.budget, self.gate_timeout, self._release)
            )
            start = self._clock()
            self.meter.begin(index)
            reports = run_test_protocol(item, nextitem)
            window = self.meter.end()
        duration = self._clock() - start
        if self.link.take_release():
            self._release()
        open_, idle, version = self.meter.snapshot()
        # xdist's public route for data: report attributes travel with the report.
        reports[-1].poolaware = ItemMeasures(  # type: ignore[attr-defined]
            need=window.need,
            peak_open=window.peak_open,
            duration=duration,
            waited=self._waited,
            start=started,
            end=wall(),
            rerun=reason,
            open=open_,
            idle=idle,
            version=version,
            waits=tuple(self._waits),
            drivers=window.drivers,
            leaks=window.leaks,
            contended=contended,
        ).to_wire()
        for report in reports:
            if reason:
                report.user_properties.append(("poolaware_rerun", reason))
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _timed_wait(self, wait: Callable[[], T]) -> T:
        """Run ``wait`` and count it as time held back by the budget."""
        begun, begun_at = self._clock(), wall()
        result = wait()
        self._count_wait(begun, begun_at)
        return result

    def _count_wait(self, begun: float, begun_at: float) -> None:
        """Count a wait that began at ``begun`` (``_clock``) and ``begun_at`` (wall clock)."""
        waited = self._clock() - begun
        self._waited += waited
        if waited >= WAIT_SPAN_MIN:
            self._waits.append((begun_at, wall()))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        """What the test's own code opens and keeps past its end is a leak."""
        self.meter.call_started()
        try:
            return (yield)
        finally:
            self.meter.call_ended()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        """Notes a connection-limit failure. After the other implementations: pytest's
        unittest support hands a ``TestCase``'s error to ``call`` in its own (tryfirst)
        implementation, so Django's and unittest's tests are seen only then."""
        report = yield
        if call.excinfo is not None and is_connection_limit_error(call.excinfo.value):
            failure = call.excinfo.value
            if call.when == "setup" and id(failure) in self._broad_failures:
                item.stash[_limit_hit_key] = NOT_RERUN_BROAD_SETUP
                return report
            refused = any(isinstance(e, BudgetRefused) for e in error_chain(failure))
            item.stash[_limit_hit_key] = RERUN_DEADLOCK if refused else RERUN_SERVER
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: pytest.FixtureDef[object], request: pytest.FixtureRequest
    ) -> Generator[None, object, object]:
        """A fixture broader than a test failing on a connection limit: its tests are
        not rerun one by one (``NOT_RERUN_BROAD_SETUP``); the summary says it once."""
        try:
            return (yield)
        except Exception as exc:
            if fixturedef.scope != "function" and is_connection_limit_error(exc):
                self._note_broad_failure(exc, fixturedef.argname, fixturedef.scope)
            raise

    def _note_broad_failure(self, exc: BaseException, name: str, scope: str) -> None:
        self._broad_failures.add(id(exc))  # pytest keeps it: re-raised to each test
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.link.send(
            Note(
                f"the {scope}-scoped fixture {name!r} failed on a connection limit "
                f"({first}); its tests were not rerun alone: each rerun would repeat "
                "that setup or fail on its error"
            )
        )

    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Iterator[None]:
        """Give every idle connection back first: this worker will run nothing more. The
        last counts say what is still open (checked against the server by the
        controller). Connects in the session's own finish (dropping its databases, say)
        are still admitted; once it is over the controller no longer answers this
        worker, so later ones (``pytest_unconfigure``) go through without asking."""
        with self._between_items_lock:  # before the session's fixtures are torn down
            self._between_items = False
        self._phase = SESSION_FINISH
        self._release()
        try:
            return (yield)
        finally:
            self._gated = False

    # -- helpers ------------------------------------------------------------------------------

    def _gate(self, background: bool) -> None:
        """Called before each new connection: wait until the budget has room for it.
        Outside a test the connect is a worker's own, like a pool's: delayed until there
        is room, never refused (there is no test to rerun)."""
        if not self._gated:
            return
        phase = self._phase
        never_refused = background or phase is not None
        begun = self._clock()
        answer = self._timed_wait(
            lambda: self.link.request(
                self._running if phase is None else NO_ITEM,
                None,
                self.gate_timeout,
                self._release,
                background=never_refused,
            )
        )
        self._connect.waited = self._clock() - begun
        self._answered(answer, never_refused, phase)

    async def _gate_async(self, background: bool) -> None:
        """The gate for a connect on an event loop: awaits the answer, so the loop's other
        coroutines (which may hold the connections that would free room) keep running."""
        if not self._gated:
            return
        phase = self._phase
        never_refused = background or phase is not None
        begun, begun_at = self._clock(), wall()
        answer = await self.link.request_async(
            self._running if phase is None else NO_ITEM,
            self.gate_timeout,
            self._release_async,
            background=never_refused,
        )
        self._count_wait(begun, begun_at)
        self._connect.waited = self._clock() - begun
        self._answered(answer, never_refused, phase)

    def _answered(self, answer: Answer | None, background: bool, phase: str | None) -> None:
        if answer is None and self.link.closed:
            raise ControllerGone(f"pytest-poolaware: {ORPHANED}")
        if answer is None and phase is not None:
            self.link.send(
                Note(
                    f"waited {self.gate_timeout:g}s for connection budget at {phase} "
                    "(outside any test); connecting anyway"
                )
            )
            return
        if answer is None and self.room is not None and not background:
            # The budget is the server's own room (shared with other runs, perhaps):
            # connecting past it would be refused, and would mislead what is learned.
            self.link.send(
                Note(f"waited {self.gate_timeout:g}s for connection budget; the test gave way")
            )
            raise BudgetRefused(
                f"pytest-poolaware: too many connections: waited {self.gate_timeout:g}s for "
                "a connection within the server's room; this test gives way and is rerun alone"
            )
        if answer is None:
            self.link.send(
                Note(f"waited {self.gate_timeout:g}s for connection budget; connecting anyway")
            )
        elif (
            # Past the budget when the budget is the server's room: refused for certain,
            # and so would a rerun be (alone it would be let past the same budget).
            answer in (Answer.OVER_BUDGET, Answer.REFUSED)
            and not background
            and self.room is not None
            and self.meter.checked_out + 1 > self.budget
        ):
            allows, limit = self.room
            raise RoomTooSmall(
                f"pytest-poolaware: this test needs {self.meter.checked_out + 1} connections "
                f"at once; the server allows this login {allows} ({limit}), {self.budget} "
                "of them for the run's tests"
            )
        elif answer is Answer.REFUSED and not background:
            raise BudgetRefused(
                "pytest-poolaware: too many connections: every test holding connections "
                "was waiting for more; this one gives way and is rerun alone"
            )

    def _opened(self, conn: object, driver: str) -> None:
        """A connection was counted: learn the server from it (no DSN was given), and
        tell the summary of a connection opened outside any test."""
        if self._learning:
            self._learn(conn, driver)
        phase = self._phase
        if phase is not None:
            waited, self._connect.waited = getattr(self._connect, "waited", 0.0), 0.0
            self.link.send(OpenedOutsideTests(phase, waited))

    def _learn(self, conn: object, driver: str) -> None:
        """A connection opened: the first one to each server and login tells the
        controller where the server is (no DSN was given)."""
        login = login_of(conn, driver)
        if login is not None and login.key not in self._logins_sent:
            self._logins_sent.add(login.key)
            self.link.send(login)

    def _room_known(self, known: RoomKnown) -> None:
        """The controller learned the server: the budget (and room) changed."""
        self.budget = known.budget
        self.room = known.room

    def _release_when_waiting_for_work(self) -> None:
        """The controller asked for idle connections back (on the receiving thread).
        Inside an item, the main thread carries that out as it waits or ends the item;
        between items it waits in xdist's loop for its next one (xdist enters an item
        only once it holds the next one or a shutdown), so a thread does it: otherwise
        the idle connections this worker holds would block another's connect until its
        gate timed out. Never blocks: the receiving thread must go on delivering the
        answers a release may wait for (a pool refilling itself asks for room)."""
        if self._between_items:
            threading.Thread(
                target=self._release_between_items, name="poolaware-release", daemon=True
            ).start()

    def _release_between_items(self) -> None:
        with self._between_items_lock:
            if self._between_items and self.link.take_release():
                # The main thread is parked in xdist's loop and no item starts while
                # the lock is held: its Django connections may be closed from here.
                self._release(parked=True)

    def _release(self, *, parked: bool = False) -> None:
        self.meter.release_idle(parked=parked)
        self.meter.report(released=True)

    async def _release_async(self) -> None:
        await self.meter.release_idle_async()
        self.meter.report(released=True)

    def _report_error(self, exc: BaseException) -> None:
        self.link.send(Note(f"connection instrumentation failed and was disabled: {exc!r}"))
