"""The connect gate of one worker: before each new connection, room from the controller.

Inside a test, a connect asks for room and waits (bounded) for the answer; the answer
may refuse it (the test gives way and is rerun alone) or say it cannot fit at all.
Outside any test the connect is the worker's own and is delayed, never refused. Every
wait is counted as time the budget held the running test back: apart, the wait for its
go (before it starts) and its waits at the gate (inside its duration), which the lower
bound takes out of the duration (``planning.lowerbound``).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from pytest_poolaware.shared.clock import monotonic, wall
from pytest_poolaware.shared.link import GoWait, WorkerLink
from pytest_poolaware.shared.options import DEFAULT_POOL_TIMEOUT, GO_TIMEOUT_GATES
from pytest_poolaware.shared.protocol import Answer, Note, RoomKnown
from pytest_poolaware.worker.meter import (
    NO_ITEM,
    BudgetRefused,
    ControllerGone,
    PoolMeter,
    RoomTooSmall,
)

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


class Overlap:
    """Time during which at least one of several threads (or coroutines) waits: a test
    whose threads wait at the gate at once is held back once, not once per thread."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting = 0
        self._since = 0.0
        #: Since the item began, and since its attempt that counts began.
        self.item = 0.0
        self.attempt = 0.0

    def enter(self) -> None:
        with self._lock:
            if not self._waiting:
                self._since = self._clock()
            self._waiting += 1

    def leave(self) -> None:
        with self._lock:
            self._waiting -= 1
            if not self._waiting:
                self._add(self._clock())

    def restart(self, *, item: bool) -> None:
        """From now on (a new attempt, or a new item too): a wait under way goes on."""
        with self._lock:
            now = self._clock()
            if self._waiting:
                self._add(now)
                self._since = now
            self.attempt = 0.0
            if item:
                self.item = 0.0

    def _add(self, now: float) -> None:
        spent = now - self._since
        self.item += spent
        self.attempt += spent


class ConnectGate:
    """Admits each new connection of one worker process (``PoolMeter``'s gate), and
    counts the running item's waits for the budget."""

    def __init__(
        self,
        link: WorkerLink,
        meter: PoolMeter,
        *,
        budget: int,
        gate_timeout: float,
        room: tuple[int, str] | None,
        go_timeout: float = GO_TIMEOUT_GATES * DEFAULT_POOL_TIMEOUT,
        release: Callable[[], None],
        release_async: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self.link = link
        self.meter = meter
        self.budget = budget
        self.gate_timeout = gate_timeout
        self.go_timeout = go_timeout
        #: A wait for a go timed out and no go came since: the controller is wedged, so
        #: the next items wait no longer than a connect does at the gate.
        self._go_overdue = False
        #: When the budget is the server's own room: what the server allows the login in
        #: all, and which limit that is ("role acc_app CONNECTION LIMIT 16").
        self.room = room
        #: Give idle connections back when the controller asks during a wait.
        self._release = release
        self._release_async = release_async
        self._clock = clock
        #: The item being run: connect requests name it, so the controller can tell them
        #: from the previous item's (its completion may reach the controller later).
        self.running = NO_ITEM
        #: Where the worker is when not running a test (None: inside one).
        self.phase: str | None = STARTUP
        #: Whether connects ask the controller: not once this worker's session has
        #: finished (the controller no longer answers a worker that has finished).
        self.gated = True
        #: The running item's wait for its go (and for a rerun's room), its time at the
        #: gate (``Overlap``), and its longer waits (spans, for the trace).
        self.go_waited = 0.0
        self.at_gate = Overlap(clock)
        self.waits: list[tuple[float, float]] = []
        #: What the connecting thread waited at the gate, for its ``OpenedOutsideTests``.
        self._connect = threading.local()

    def begin_item(self, index: int) -> None:
        """A new item: its connects name it, and its waits start from none."""
        self.running = index
        self.go_waited = 0.0
        self.at_gate.restart(item=True)
        self.waits = []

    def begin_attempt(self) -> None:
        """The item's attempt that may count begins: its time at the gate starts from none
        (a failed first attempt's waits are the item's, not the rerun's)."""
        self.at_gate.restart(item=False)

    @property
    def waited(self) -> float:
        """The running item's time held back by the budget: for its go and at the gate."""
        return self.go_waited + self.at_gate.item

    @property
    def gate_waited(self) -> float:
        """The time the attempt that counts spent at the gate (inside its duration)."""
        return self.at_gate.attempt

    def item_waits(self) -> dict[str, Any]:
        """The running item's waits, as its ``ItemMeasures`` carry them."""
        return {
            "waited": self.waited,
            "go_waited": self.go_waited,
            "gate_waited": self.gate_waited,
            "waits": tuple(self.waits),
        }

    def wait_for_go(self, wait: Callable[[float], GoWait]) -> tuple[GoWait, float]:
        """``waiting_for_go`` for the go itself, bounded (``wait`` takes the bound): how
        the wait ended, and the bound it had."""
        bound = self.gate_timeout if self._go_overdue else self.go_timeout
        went = self.waiting_for_go(lambda: wait(bound))
        self._go_overdue = went is GoWait.TIMED_OUT
        return went, bound

    def waiting_for_go(self, wait: Callable[[], T]) -> T:
        """Run ``wait`` (for the go, or for room to rerun) and count it as the item's
        wait to start."""
        begun = self._clock()
        result = self.timed(wait)
        self.go_waited += self._clock() - begun
        return result

    def room_known(self, known: RoomKnown) -> None:
        """The controller learned the server: the budget (and room) changed."""
        self.budget = known.budget
        self.room = known.room

    def timed(self, wait: Callable[[], T]) -> T:
        """Run ``wait`` and keep it as a span (the trace) if it was long enough to show."""
        begun, begun_at = self._clock(), wall()
        result = wait()
        self._count_wait(begun, begun_at)
        return result

    def _count_wait(self, begun: float, begun_at: float) -> None:
        """Keep a wait that began at ``begun`` (``_clock``) and ``begun_at`` (wall clock)."""
        if self._clock() - begun >= WAIT_SPAN_MIN:
            self.waits.append((begun_at, wall()))

    def take_waited(self) -> float:
        """What the connecting thread last waited at the gate (then forgotten)."""
        waited, self._connect.waited = getattr(self._connect, "waited", 0.0), 0.0
        return float(waited)

    def wait(self, background: bool) -> None:
        """Called before each new connection: wait until the budget has room for it.
        Outside a test the connect is a worker's own, like a pool's: delayed until there
        is room, never refused (there is no test to rerun)."""
        if not self.gated:
            return
        phase = self.phase
        never_refused = background or phase is not None
        begun = self._clock()
        item = self.running if phase is None else NO_ITEM
        self.at_gate.enter()
        try:
            rid, answer = self.timed(lambda: self._request(item, never_refused))
        finally:
            self.at_gate.leave()
        self._connect.waited = self._clock() - begun
        self._answered(answer, never_refused, phase, rid)

    def _request(self, item: int, background: bool) -> tuple[int, Answer | None]:
        """Ask for one more connection and wait for the answer (None: the gate timed out);
        the request's id names it in a note on that timeout."""
        rid = self.link.ask(item, background=background)
        return rid, self.link.answer(rid, self.gate_timeout, self._release)

    async def wait_async(self, background: bool) -> None:
        """The gate for a connect on an event loop: awaits the answer, so the loop's other
        coroutines (which may hold the connections that would free room) keep running."""
        if not self.gated:
            return
        phase = self.phase
        never_refused = background or phase is not None
        begun, begun_at = self._clock(), wall()
        self.at_gate.enter()
        try:
            rid = self.link.ask(
                self.running if phase is None else NO_ITEM, background=never_refused
            )
            answer = await self.link.answer_async(rid, self.gate_timeout, self._release_async)
        finally:
            self.at_gate.leave()
        self._count_wait(begun, begun_at)
        self._connect.waited = self._clock() - begun
        self._answered(answer, never_refused, phase, rid)

    def _answered(
        self, answer: Answer | None, background: bool, phase: str | None, rid: int
    ) -> None:
        if answer is None and self.link.closed:
            raise ControllerGone(f"pytest-poolaware: {ORPHANED}")
        # A wait that timed out names its request: the controller judges it (a wait the
        # budget had room for is a fault of the plugin's, not a wait for the budget).
        waited = f"waited {self.gate_timeout:g}s for connection budget"
        if answer is None and phase is not None:
            self.link.send(Note(f"{waited} at {phase} (outside any test); connecting anyway", rid))
            return
        if answer is None and self.room is not None and not background:
            # The budget is the server's own room (shared with other runs, perhaps):
            # connecting past it would be refused, and would mislead what is learned.
            self.link.send(Note(f"{waited}; the test gave way", rid))
            raise BudgetRefused(
                f"pytest-poolaware: too many connections: waited {self.gate_timeout:g}s for "
                "a connection within the server's room; this test gives way and is rerun alone"
            )
        if answer is None:
            self.link.send(Note(f"{waited}; connecting anyway", rid))
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
