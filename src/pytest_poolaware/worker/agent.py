"""Worker side of ``--dist poolaware``: waits for the go, measures each test, reruns on limits.

The connect gate is ``gate``; which attempts failed on a connection limit, and whether
they are rerun, ``reruns``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Final

import pytest

from pytest_poolaware.shared.clock import monotonic, wall
from pytest_poolaware.shared.compat import run_test_protocol
from pytest_poolaware.shared.errors import is_connection_limit_error
from pytest_poolaware.shared.link import GoWait, WorkerLink
from pytest_poolaware.shared.markers import (
    GROUP_MARKER,
    PARALLEL_MARKER,
    SERIAL_MARKER,
    Markers,
    group_name,
    mark_group_name,
)
from pytest_poolaware.shared.options import DEFAULT_POOL_TIMEOUT, GO_TIMEOUT_GATES
from pytest_poolaware.shared.protocol import (
    Collected,
    Counts,
    ItemMeasures,
    Note,
    OpenedOutsideTests,
)
from pytest_poolaware.worker.gate import (
    BETWEEN_TESTS,
    COLLECTION,
    ORPHANED,
    SESSION_FINISH,
    SESSION_START,
    STARTUP,
    ConnectGate,
)
from pytest_poolaware.worker.login import login_of
from pytest_poolaware.worker.meter import PoolMeter, Window
from pytest_poolaware.worker.reruns import (
    RERUN_DEADLOCK as RERUN_DEADLOCK,
)
from pytest_poolaware.worker.reruns import (
    RERUN_SERVER as RERUN_SERVER,
)
from pytest_poolaware.worker.reruns import (
    LimitFailures,
    drop_failed_attempt,
)

#: The worker's note when a test's wait for its go timed out (the summary shows it once).
GO_TIMED_OUT: Final = (
    "a test waited poolaware_go_timeout for its go and failed without running: the "
    "controller let nothing start"
)


def fail_without_running(item: pytest.Item, waited: float) -> None:
    """No go came within the bound: the test fails without running (it never starts
    past the budget, and never waits for ever)."""
    message = (
        f"pytest-poolaware: waited {waited:g}s for the controller's go to start this "
        "test; it did not run (raise poolaware_go_timeout if the run's tests "
        "legitimately keep others waiting longer)"
    )
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    calls = (
        pytest.CallInfo.from_call(lambda: _fail(message), "setup"),
        pytest.CallInfo.from_call(lambda: _fail(None), "teardown"),
    )
    for call in calls:
        report = ihook.pytest_runtest_makereport(item=item, call=call)
        ihook.pytest_runtest_logreport(report=report)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


def item_measures(
    gate: ConnectGate,
    meter: PoolMeter,
    window: Window,
    duration: float,
    started: float,
    reason: str,
    contended: bool,
) -> ItemMeasures:
    """What the controller hears of an item: its window, its waits, the meter's counts."""
    open_, idle, version = meter.snapshot()
    return ItemMeasures(
        need=window.need,
        peak_open=window.peak_open,
        duration=duration,
        **gate.item_waits(),
        start=started,
        end=wall(),
        rerun=reason,
        open=open_,
        idle=idle,
        version=version,
        drivers=window.drivers,
        leaks=window.leaks,
        contended=contended,
    )


def _fail(message: str | None) -> None:
    """A phase of a test that never ran: failed with ``message``, or passed (None)."""
    if message is not None:
        pytest.fail(message, pytrace=False)


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


class LeftOut:
    """What this worker's collection left out of the run: items deselected (``-k``,
    ``-m``, ``--deselect``, ``--sw``, ``--lf``) or dropped by a plugin's
    ``pytest_collection_modifyitems``, and files not collected (an error, or skipped
    whole). The controller keeps the learned data of the tests a run did not collect
    whenever any of it happened (``planning.history.Selection``)."""

    def __init__(self) -> None:
        self.deselected = 0
        self.dropped = 0
        self.uncollected = 0

    def pytest_deselected(self, items: Sequence[pytest.Item]) -> None:
        self.deselected += len(items)

    @pytest.hookimpl(wrapper=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> Iterator[None]:
        """A plugin may drop items without calling ``pytest_deselected``: count both."""
        found = len(items)
        try:
            return (yield)
        finally:
            self.dropped += max(0, found - len(items))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if not report.passed:
            self.uncollected += 1

    @property
    def items(self) -> int:
        """Items left out (deselected ones are mostly dropped too: counted once)."""
        return max(self.deselected, self.dropped)


class IdleRelease:
    """Gives this worker's idle connections back when the controller asks (``ReleaseIdle``).

    The main thread waits for work in xdist's own loop (between items), where it cannot
    hear the ask: the release is then carried out on a thread of its own, under a lock so
    no item starts meanwhile.
    """

    def __init__(self, link: WorkerLink, meter: PoolMeter) -> None:
        self.link = link
        self.meter = meter
        self._between_items = False
        self._between_items_lock = threading.Lock()

    def busy(self) -> None:
        """The main thread leaves xdist's loop (a release carried out meanwhile ends first)."""
        with self._between_items_lock:
            self._between_items = False

    def waiting_for_work(self) -> None:
        """The main thread goes back to xdist's loop, after an item."""
        with self._between_items_lock:
            self._between_items = True
        if self.link.release_asked:  # asked after the item's end took its asks
            self.asked()

    def asked(self) -> None:
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
                self.give_back(parked=True)

    def give_back(self, *, parked: bool = False) -> None:
        self.meter.release_idle(parked=parked)
        self.meter.report(released=True)

    async def give_back_async(self) -> None:
        await self.meter.release_idle_async()
        self.meter.report(released=True)


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
        go_timeout: float = GO_TIMEOUT_GATES * DEFAULT_POOL_TIMEOUT,
        room: tuple[int, str] | None = None,
        learn: bool = False,
        clock: Callable[[], float] = monotonic,
        meter: PoolMeter | None = None,
    ) -> None:
        self.link = link
        self.retry_on_limit = retry_on_limit
        self._clock = clock
        self._index: dict[pytest.Item, int] = {}
        self._learning = learn
        self._limits = LimitFailures(link)
        self.left_out = LeftOut()  # registered beside the agent (``plugin``)
        #: Servers and logins already sent to the controller (``learn``).
        self._logins_sent: set[tuple[str, int, str, str]] = set()
        #: A meter counting since start-up (``PoolMeter.unbound``) is taken over.
        self.meter = meter if meter is not None else PoolMeter.unbound()
        self.idle = IdleRelease(link, self.meter)
        self.gate = ConnectGate(
            link,
            self.meter,
            budget=budget,
            gate_timeout=gate_timeout,
            go_timeout=go_timeout,
            room=room,
            release=self.idle.give_back,
            release_async=self.idle.give_back_async,
            clock=clock,
        )
        counted_before = self.meter.bind(
            on_change=self._send_counts,
            gate=self.gate.wait,
            gate_async=self.gate.wait_async,
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
        self._listen()

    def _listen(self) -> None:
        """What the controller's news does once it arrives (on the receiving thread)."""
        link = self.link
        link.on_server_pids = lambda sample: self.meter.reconcile(sample.pids, before=sample.taken)
        link.on_room_known = self.gate.room_known
        link.on_release = self.idle.asked

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
        self.gate.phase = SESSION_START

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self, session: pytest.Session) -> None:
        self.gate.phase = COLLECTION

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Send markers before xdist's own collectionfinish, so they arrive first."""
        self.gate.phase = BETWEEN_TESTS
        self._install_meter()
        if self.meter.idle_django():  # opened at start-up or collection, idle now
            self.meter.report(released=False)
        self._index = {item: i for i, item in enumerate(session.items)}
        markers = tuple(item_markers(item) for item in session.items)
        conflicts = tuple(
            item.nodeid for item, m in zip(session.items, markers, strict=True) if m.both
        )
        left_out = self.left_out
        self.link.send(Collected(markers, conflicts, left_out.items, left_out.uncollected))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool:
        self.idle.busy()
        self.gate.phase = None
        try:
            return self._run_item(item, nextitem)
        finally:
            self.gate.phase = BETWEEN_TESTS
            self.idle.waiting_for_work()

    def _run_item(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool:
        index = self._index[item]
        self._install_meter()
        self.gate.begin_item(index)
        went, bound = self.gate.wait_for_go(
            lambda bound: self.link.wait_go(index, self.idle.give_back, bound)
        )
        if went is GoWait.TIMED_OUT:
            self.link.send(Note(GO_TIMED_OUT))
            fail_without_running(item, bound)
            return True
        if went is GoWait.GONE:
            # The controller has gone (its run was killed): nobody coordinates this
            # worker's connections any more. Start nothing, give the idle ones back.
            self.idle.give_back()
            item.session.shouldstop = ORPHANED
            return True
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        started = wall()
        reports, window, duration, contended, reason = self._attempts(item, nextitem, index)
        if self.link.take_release():
            self.idle.give_back()
        # xdist's public route for data: report attributes travel with the report.
        reports[-1].poolaware = item_measures(  # type: ignore[attr-defined]
            self.gate, self.meter, window, duration, started, reason, contended
        ).to_wire()
        for report in reports:
            if reason:
                report.user_properties.append(("poolaware_rerun", reason))
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _attempts(
        self, item: pytest.Item, nextitem: pytest.Item | None, index: int
    ) -> tuple[list[pytest.TestReport], Window, float, bool, str]:
        """Run the item, and once more alone if it failed on a connection limit and the
        rerun is on: the reports and measures of the attempt that counts, whether the
        server refused the first one a connection, and why it was rerun ("": it was not)."""
        start = self._clock()
        self.gate.begin_attempt()
        self.meter.begin(index)
        reports = run_test_protocol(item, nextitem)
        window = self.meter.end()
        retry = self.retry_on_limit and not self.link.closed
        contended, reason = self._limits.take(item, retry=retry)
        if reason:
            drop_failed_attempt()
            self.idle.give_back()
            self.gate.waiting_for_go(
                lambda: self.link.request(
                    index, self.gate.budget, self.gate.go_timeout, self.idle.give_back
                )
            )
            start = self._clock()
            self.gate.begin_attempt()
            self.meter.begin(index)
            reports = run_test_protocol(item, nextitem)
            window = self.meter.end()
        return reports, window, self._clock() - start, contended, reason

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
        self._limits.note_report(item, call)
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
                self._limits.note_fixture(exc, fixturedef.argname, fixturedef.scope)
            raise

    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Iterator[None]:
        """Give every idle connection back first: this worker will run nothing more. The
        last counts say what is still open (checked against the server by the
        controller). Connects in the session's own finish (dropping its databases, say)
        are still admitted; once it is over the controller no longer answers this
        worker, so later ones (``pytest_unconfigure``) go through without asking."""
        self.idle.busy()  # before the session's fixtures are torn down
        self.gate.phase = SESSION_FINISH
        self.idle.give_back()
        try:
            return (yield)
        finally:
            self.gate.gated = False

    # -- helpers ------------------------------------------------------------------------------

    def _opened(self, conn: object, driver: str) -> None:
        """A connection was counted: learn the server from it (no DSN was given), and
        tell the summary of a connection opened outside any test."""
        if self._learning:
            self._learn(conn, driver)
        phase = self.gate.phase
        if phase is not None:
            self.link.send(OpenedOutsideTests(phase, self.gate.take_waited()))

    def _learn(self, conn: object, driver: str) -> None:
        """A connection opened: the first one to each server and login tells the
        controller where the server is (no DSN was given)."""
        login = login_of(conn, driver)
        if login is not None and login.key not in self._logins_sent:
            self._logins_sent.add(login.key)
            self.link.send(login)

    def _send_counts(self, open_: int, idle: int, released: bool, version: int) -> None:
        self.link.send(Counts(open_, idle, released, version))

    def _report_error(self, exc: BaseException) -> None:
        self.link.send(Note(f"connection instrumentation failed and was disabled: {exc!r}"))
