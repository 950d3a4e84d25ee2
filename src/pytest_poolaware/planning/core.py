"""Scheduling decisions for ``--dist poolaware``: lanes, the connection budget, ordering.

Pure logic with no xdist or SQLAlchemy imports: the xdist adapter feeds it events and
carries out the actions it returns, so every decision can be unit-tested directly. The
planner combines two parts, each with its own per-worker state: placement
(``placement``: who runs what) and admission (``admission``: what may start or connect
now, within the budget).

Vocabulary:

* a worker's *queue* holds the items sent to it and not completed yet, in run order;
* a *go* is the permission for one queued item to start (items start only in queue
  order, so the go'ed items always form a prefix of the queue);
* a worker's *commitment* is what it may hold open: the larger of its live open
  connections and the expected need of each item it may start;
* a *request* is a worker blocked mid-test, asking for one more connection (or for
  room to rerun a test that hit the server's limit);
* a worker's *watermark* is the highest collection index handed to it: as with xdist's
  ``load``, a worker is never handed a test that comes before one it already holds or
  ran, so each worker runs its tests in collection order (tests returned by a crash are
  the exception, as with ``load``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pytest_poolaware.planning.admission import Admission as Admission
from pytest_poolaware.planning.admission import Go as Go
from pytest_poolaware.planning.admission import Grant as Grant
from pytest_poolaware.planning.admission import Overrun as Overrun
from pytest_poolaware.planning.admission import Release as Release
from pytest_poolaware.planning.critical import LaneAhead, LaneItem
from pytest_poolaware.planning.fanout import Placement
from pytest_poolaware.planning.holders import RequestKind as RequestKind
from pytest_poolaware.planning.lanes import ItemSpec as ItemSpec
from pytest_poolaware.planning.lanes import Lane as Lane
from pytest_poolaware.planning.lanes import lane_for as lane_for
from pytest_poolaware.planning.placement import Order as Order
from pytest_poolaware.planning.placement import Placer as Placer
from pytest_poolaware.planning.placement import Send as Send
from pytest_poolaware.planning.placement import Shutdown as Shutdown
from pytest_poolaware.planning.priors import Priors
from pytest_poolaware.shared.limits import Limits as Limits
from pytest_poolaware.shared.protocol import Answer as Answer

W = TypeVar("W", bound=Hashable)

Action = Send | Shutdown | Go | Grant | Release


@dataclass(frozen=True)
class Statistics:
    """A snapshot for reporting and tests (trio-style ``statistics()``)."""

    budget: int
    committed: int
    open: int
    peak_open: int
    pending_serial: int
    pending_fanout: int
    in_flight: int
    completed: int
    overruns: tuple[Overrun, ...]
    #: Collected items whose learned duration was known at the start (0: a cold run).
    learned: int = 0
    #: The largest budget in force since the first item's go (the lower bound's B).
    largest_budget: int = 0
    #: Items not measured yet that started with a relative's need (``priors``).
    priors: int = 0


class Planner(Generic[W]):
    """Decides which worker runs what, and when, so open connections stay within budget.

    Called by the xdist adapter (``scheduler.PoolAwareScheduling``) on the controller's
    main thread; every method returns the actions to carry out, in order: placement's
    (``Send``, ``Shutdown``) first, then admission's (``Go``, ``Grant``, ``Release``).

    One budget gates every item and connect: the run's own, the tightest room over the
    logins read (``docs/design.md``, "Several logins"), which keeps every login safe.
    """

    def __init__(
        self, budget: int, *, unknown_need: int = 1, order: Order = Order.COLLECTION
    ) -> None:
        self.unknown_need = unknown_need
        self._placer: Placer[W] = Placer(order=order)
        self._admission: Admission[W] = Admission(
            budget, need_of=self.need_of, seconds_of=self._placer.seconds_of
        )
        #: Peaks measured in this run, by item.
        self._needs: dict[int, int] = {}
        self._priors = Priors()
        #: The need each item not measured yet started with, until it ends (``_hold``),
        #: and those that were a relative's (``prior_of``).
        self._started: dict[int, int] = {}
        self._started_on_prior: dict[int, int] = {}
        #: Workers admission knows: attached (side channel up) or added (collected).
        self._attached: set[W] = set()

    # -- inputs -------------------------------------------------------------------------

    def load(self, tests: Sequence[ItemSpec], *, fanout_open: bool = True) -> list[Action]:
        """Take the collection (once): the serial lane in collection order, the fan-out
        in collection order cut into ranges once the workers are in (``Order.COLLECTION``)
        or longest group first (``Order.DURATION``).

        With ``fanout_open=False`` nothing starts until ``open_fanout`` (every worker is
        in), except a serial lane whose first item is long (``EARLY_START_SECONDS``):
        the first worker up starts the run's critical path while the others boot.
        """
        self._placer.load(tests, fanout_open=fanout_open)
        self._priors = Priors([test.family for test in tests])
        for index, test in enumerate(tests):
            if test.need is not None:
                self._priors.learn(index, test.need)
        return self._plan()

    def open_fanout(self) -> list[Action]:
        """Every worker expected at the start is in: share out the fan-out (idempotent)."""
        self._placer.open_fanout()
        return self._plan()

    def attach(self, worker: W) -> None:
        """A worker's side channel is up, before it has collected: its connects (in
        ``pytest_configure``, conftest imports, session start, collection) are admitted
        within the budget like a test's, and what it holds counts against the budget
        (``docs/design.md``, "Connections outside tests"). Idempotent; nothing is placed
        or decided until the worker asks for something."""
        if worker in self._attached:
            return
        self._attached.add(worker)
        self._admission.add_worker(worker)

    def add_worker(self, worker: W) -> list[Action]:
        """A worker is ready (initially, or replacing a crashed one)."""
        self._placer.add_worker(worker)
        self.attach(worker)
        return self._plan() if self.loaded else []

    def remove_worker(self, worker: W, *, crashed: bool = True) -> tuple[int | None, list[Action]]:
        """A worker is gone; returns the item it was running, if it crashed mid-item.

        The head of a crashed worker's queue counts as the running item (as in xdist's
        ``load``); the rest, or all of a worker that ended normally with items still
        queued (it was shut down first), goes back to the front of its lane, in order.
        """
        running = (
            self._placer.remove_worker(worker, crashed=crashed)
            if worker in self._placer.workers
            else None  # attached only: it never collected, so it ran nothing
        )
        if worker in self._attached:
            self._attached.discard(worker)
            self._admission.remove_worker(worker)
        return running, self._plan()

    def set_budget(self, limits: Limits) -> list[Action]:
        """The room changed mid-run, up or down: see ``Admission.set_budget``."""
        return self._plan() if self._admission.set_budget(limits) else []

    def largest_waiting_need(self) -> int:
        """The most connections an item held back by the budget expects (0: none is),
        so that a run sharing the server's room can ask for more of it."""
        return self._admission.largest_waiting_need()

    def mid_test_waits(self) -> tuple[int | None, bool]:
        """See ``Admission.mid_test_waits``."""
        return self._admission.mid_test_waits()

    def shut_down(self, worker: W) -> None:
        """The worker was told to shut down by someone else (xdist stopping the run)."""
        self._placer.shut_down(worker)

    def requeue(self, index: int) -> list[Action]:
        """Run an item again (xdist ``mark_test_pending``, used by crash handlers)."""
        self._placer.requeue(index)
        return self._plan()

    def counts(
        self,
        worker: W,
        open_: int,
        idle: int,
        *,
        released: bool = False,
        version: int | None = None,
    ) -> list[Action]:
        """Live connection counts measured inside a worker: see ``Admission.counts``."""
        if not self._admission.counts(worker, open_, idle, released=released, version=version):
            return []
        return self._plan()

    def counts_changed(self, worker: W, open_: int, idle: int, version: int | None = None) -> bool:
        """Whether these counts are news (most items end with the counts they began with)."""
        return self._admission.counts_changed(worker, open_, idle, version)

    def completed(
        self, worker: W, index: int, *, need: int | None = None, duration: float | None = None
    ) -> list[Action]:
        """The worker finished an item; ``need`` is its measured peak, if measured."""
        self._admission.completed(worker, index, need=need)
        self._placer.complete(worker, index)
        self._started.pop(index, None)
        if need is not None:
            self._needs[index] = need
            self._priors.learn(index, need)
        if duration is not None:
            self._placer.learn(index, need=self.need_of(index), duration=duration)
        if self._settled_after_completion(worker):
            return []
        return self._plan()

    def _settled_after_completion(self, worker: W) -> bool:
        """Whether a completion leaves nothing to decide: the hot path of big suites.

        True only when no worker waits for anything (no requests, no item held back by
        the budget, every queued item already go'ed or as many goes ahead as a pass
        gives) and placement would hand this worker nothing. A completion only frees
        room, and nobody wants room, so ``_plan`` would return no action.
        """
        return self._placer.settled_after_completion(worker) and self._admission.settled()

    def request(
        self,
        worker: W,
        request: int,
        want: int | None = None,
        *,
        item: int | None = None,
        background: bool = False,
    ) -> list[Action]:
        """Item ``item`` of a worker is blocked until it may hold one more connection, or,
        with ``want``, that many (to rerun an item that hit the server's limit).
        ``background``: a pool's own connect, which is never refused."""
        if not self._admission.request(worker, request, want, item=item, background=background):
            return []
        return self._plan()

    def withdraw(self, worker: W, request: int) -> list[Action]:
        """The worker stopped waiting for a request (its gate timed out): it is dropped,
        and the room it kept for itself may go to others."""
        return self._plan() if self._admission.withdraw(worker, request) else []

    # -- queries ------------------------------------------------------------------------

    @property
    def budget(self) -> int:
        return self._admission.budget

    @property
    def order(self) -> Order:
        return self._placer.order

    @property
    def placement(self) -> Placement:
        return self._placer.placement

    @property
    def overruns(self) -> list[Overrun]:
        """Items let past the budget."""
        return list(self._admission.overruns)

    @property
    def loaded(self) -> bool:
        return self._placer.loaded

    @property
    def has_pending(self) -> bool:
        """Items not yet completed: pending in a lane or queued on a worker."""
        return self._placer.has_pending

    def unfinished(self) -> list[int]:
        """Items neither completed nor returned as crashed, in collection order."""
        return self._placer.unfinished()

    @property
    def out_of_order(self) -> frozenset[int]:
        """Items run below a worker's watermark because no worker could take them in
        collection order (handed back as a crashed worker's are)."""
        return frozenset(self._placer.out_of_order)

    @property
    def tests_finished(self) -> bool:
        return self.loaded and not self.has_pending

    def need_of(self, index: int) -> int:
        """Expected peak connections of an item: measured, learned, its relatives'
        (``priors``, never more than the budget: a guess alone makes no test overrun it),
        or assumed."""
        if index in self._needs:
            return self._needs[index]
        need = self._placer.tests[index].need
        if need is not None:
            return need
        if index in self._started:
            return self._started[index]
        prior = self._priors.need(index)
        return self.unknown_need if prior is None else min(prior, self.budget)

    def prior_of(self, index: int) -> int | None:
        """The relative's need an item not measured yet started with (None: it had its own,
        or none was known)."""
        return self._started_on_prior.get(index)

    def lane_of(self, index: int) -> Lane:
        return self._placer.tests[index].lane

    def running(self, worker: W) -> int | None:
        """The item the worker runs or starts next, if it may start one."""
        return self._admission.running(worker)

    def has_room_for_one_more(self, worker: W) -> bool:
        """Whether one more connection of the worker's fits the budget now."""
        return self._admission.has_room_for_one_more(worker)

    def describe(self) -> str:
        """One line of per-worker state, for ``--debug`` logs."""
        return " | ".join(
            f"{w}: {self._admission.describe(w)}{' shut' if self._placer.is_shut(w) else ''}"
            for w in self._placer.workers
        )

    def statistics(self) -> Statistics:
        placer, admission = self._placer, self._admission
        return Statistics(
            budget=admission.budget,
            committed=admission.committed,
            open=admission.open,
            peak_open=admission.peak_open,
            pending_serial=placer.pending(Lane.SERIAL),
            pending_fanout=placer.pending(Lane.FANOUT),
            in_flight=placer.in_flight,
            completed=len(placer.completed),
            overruns=tuple(self.overruns),
            learned=placer.learned,
            largest_budget=admission.largest_budget,
            priors=len(self._started_on_prior),
        )

    # -- decisions ----------------------------------------------------------------------

    def _plan(self) -> list[Action]:
        """Placement hands items out, admission lets them start: the newly handed-out
        items join admission's view of each queue in between."""
        self._admission.note_peak()
        placed: list[Send | Shutdown] = []
        # Before the collection is in nothing is placed, but attached workers connect.
        if self.loaded:
            self._placer.fill(placed)
        for action in placed:
            if isinstance(action, Send):
                self._admission.queued(action.worker, action.indices)  # type: ignore[arg-type]
        admitted: list[Go | Grant | Release] = []
        self._admission.admit(
            admitted,
            first=self._placer.serial_worker,
            lane=self._lane_ahead(),
            can_start=self._placer.can_enter,
        )
        for decision in admitted:
            if isinstance(decision, Go):
                self._hold(decision.index)
        return [*placed, *admitted]

    def _hold(self, index: int) -> None:
        """An item not measured yet keeps the need it started with until it ends: what
        its relatives measure meanwhile changes the plan of those still to start, never
        what admission granted it (and frees at its end)."""
        if index in self._needs or self._placer.tests[index].need is not None:
            return
        self._started[index] = need = self.need_of(index)
        if self._priors.need(index) is not None:
            self._started_on_prior[index] = need

    def _lane_ahead(self) -> LaneAhead[W] | None:
        """The serial lane's items still to start, each with its need if known, for
        admission to keep room for (``critical``)."""
        ahead = self._placer.lane_ahead()
        if ahead is None:
            return None
        worker, items = ahead
        seconds_of = self._placer.seconds_of
        lane = (LaneItem(i, self._known_need(i), seconds_of(i)) for i in items)
        return LaneAhead(worker, tuple(lane), seconds_of)

    def _known_need(self, index: int) -> int | None:
        """An item's need measured in this run or learned before (None: not known)."""
        return self._needs.get(index, self._placer.tests[index].need)
