"""Admission: which queued item may start, and which blocked connect may proceed, so the
connections open stay within the budget (``docs/design.md``, "Admission").

Pure logic with no xdist or database imports. It knows each worker's queue (the items
handed to it, in run order) but not how they were chosen: placement (``placement``) hands
items out, admission lets them start. What it knows of each worker is kept in
``holders``; one pass of its rules is ``goes``; what the pass leaves blocked is relieved
here.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from pytest_poolaware.planning.critical import LaneAhead, critical_path
from pytest_poolaware.planning.goes import GO_AHEAD_REFILL as GO_AHEAD_REFILL
from pytest_poolaware.planning.goes import GO_AHEAD_SECONDS as GO_AHEAD_SECONDS
from pytest_poolaware.planning.goes import HANDOVER_AFTER_GOES as HANDOVER_AFTER_GOES
from pytest_poolaware.planning.goes import AdmissionAction as AdmissionAction
from pytest_poolaware.planning.goes import AdmissionPass
from pytest_poolaware.planning.goes import Go as Go
from pytest_poolaware.planning.goes import Grant as Grant
from pytest_poolaware.planning.goes import Release as Release
from pytest_poolaware.planning.holders import (
    Holder,
    Request,
    RequestKind,
    can_progress,
    largest_want,
    mid_test_waits,
    settled,
    waiting_requests,
)
from pytest_poolaware.shared.limits import Limits
from pytest_poolaware.shared.protocol import Answer

W = TypeVar("W", bound=Hashable)


@dataclass(frozen=True)
class Overrun:
    """An item was let past the budget: it needed more than the room there was. What
    held the rest of the budget at that moment says why (the summary's warning)."""

    index: int
    need: int
    budget: int
    alone: bool
    #: Connections open in workers running no test then, one count per such worker
    #: (largest first), the item's own worker included when it was starting the item:
    #: connections kept between tests (a persistent connection, a pool's idle ones).
    outside: tuple[int, ...] = ()
    #: Connections open then in the other workers' running tests.
    in_tests: int = 0


class Admission(Generic[W]):
    """Goes, grants, releases and wait-die for the run's budget.

    ``need_of`` gives an item's expected peak connections (measured, learned or
    assumed): the planner owns what is known of items.
    """

    def __init__(
        self,
        budget: int,
        *,
        need_of: Callable[[int], int],
        seconds_of: Callable[[int], float] = lambda _: 0.0,
    ) -> None:
        #: The budget, what it may grow to and how a wait for more ends (``set_budget``).
        self.limits = Limits(budget)
        #: The largest budget in force since the first go (the lower bound's B), and
        #: whether an item has had its go yet.
        self.largest_budget = budget
        self._went = False
        self.need_of = need_of
        #: An item's expected seconds (``GO_AHEAD_SECONDS``).
        self.seconds_of = seconds_of
        #: The budget was lowered below what the workers hold: until they are back
        #: under it, idle connections are asked back even with nobody waiting.
        self._lowered_under = False
        self._workers: dict[W, Holder] = {}
        self._counter = 0
        self._peak_open = 0
        self.overruns: list[Overrun] = []

    # -- inputs -------------------------------------------------------------------------

    def add_worker(self, worker: W) -> None:
        assert worker not in self._workers
        self._workers[worker] = Holder(order=self._next())

    def remove_worker(self, worker: W) -> None:
        del self._workers[worker]

    def queued(self, worker: W, indices: Iterable[int]) -> None:
        """Items were handed to the worker (they start once they get a go)."""
        self._workers[worker].queue.extend(indices)

    def set_budget(self, limits: Limits) -> bool:
        """The room changed mid-run (another run on the server took or gave back a
        share): what already started keeps what it was granted, new goes and grants
        follow the new budget. Returns whether anything changed.

        Lowered below what the workers hold, it lets nothing new start and grants no
        connect beyond what a running item was already granted, asks the workers for
        their idle connections back, and the run converges to it as items end.

        The ceiling, ``give_way`` and ``may_pass`` say how a wait for more ends
        (``Limits``): the budget grows, a blocked item gives way as in a deadlock, or
        an item goes past the budget alone.
        """
        if limits == self.limits:
            return False
        self.limits = limits
        budget = limits.budget
        self.largest_budget = max(self.largest_budget, budget) if self._went else budget
        self._lowered_under = self.committed > budget
        return True

    def counts(
        self,
        worker: W,
        open_: int,
        idle: int,
        *,
        released: bool = False,
        version: int | None = None,
    ) -> bool:
        """Live connection counts measured inside a worker; ``released`` when they answer
        a ``Release``. ``version`` orders counts that travel by different routes (the side
        channel, item reports): counts not newer than those already taken are ignored.
        Returns whether they are news to decide on."""
        state = self._workers.get(worker)
        return state is not None and state.take_counts(open_, idle, released, version)

    def counts_changed(self, worker: W, open_: int, idle: int, version: int | None = None) -> bool:
        """Whether these counts are news (most items end with the counts they began with)."""
        state = self._workers.get(worker)
        return state is not None and state.counts_changed(open_, idle, version)

    def completed(self, worker: W, index: int, *, need: int | None = None) -> None:
        """The worker finished an item; ``need`` is its measured peak, if measured."""
        self._workers[worker].complete(index, self.need_of(index))
        if need is not None and self.overruns:
            # An overrun is reported with what the item turned out to need in all.
            self.overruns = [
                replace(o, need=max(o.need, need)) if o.index == index else o for o in self.overruns
            ]

    def request(
        self,
        worker: W,
        request: int,
        want: int | None = None,
        *,
        item: int | None = None,
        background: bool = False,
    ) -> bool:
        """Item ``item`` of a worker is blocked until it may hold one more connection, or,
        with ``want``, that many (to rerun an item that hit the server's limit).
        ``background``: a pool's own connect, which is never refused. Returns whether the
        request was taken (False: the worker is gone)."""
        state = self._workers.get(worker)
        if state is None:
            return False
        kind = RequestKind.CONNECT if want is None else RequestKind.RERUN
        state.ask(Request(worker, request, self._next(), kind, want or 0, item, background))
        return True

    def withdraw(self, worker: W, request: int) -> bool:
        """The worker stopped waiting for ``request`` (its gate timed out: it connected
        anyway, or its test gave way): granted later, it would hold room nobody uses.
        Returns whether it was still waiting."""
        state = self._workers.get(worker)
        kept = [] if state is None else [r for r in state.requests if r.request != request]
        if state is None or len(kept) == len(state.requests):
            return False
        state.requests = kept
        return True

    # -- queries ------------------------------------------------------------------------

    @property
    def budget(self) -> int:
        return self.limits.budget

    def largest_waiting_need(self) -> int:
        """The most connections an item held back by the budget expects (0: none is),
        so that a run sharing the server's room can ask for more of it."""
        return largest_want(self._workers.values(), self.need_of, self.limits.ceiling)

    def mid_test_waits(self) -> tuple[int | None, bool]:
        """The test waiting longest mid-test for a connection, and whether a rerun
        waits so: a run sharing the server asks for them (``holders.mid_test_waits``)."""
        return mid_test_waits(self._workers.values())

    def has_room_for_one_more(self, worker: W) -> bool:
        """Whether one more connection of the worker's fits the budget now: a connect
        request of its kept from admission (the server being learned) would be granted."""
        state = self._workers.get(worker)
        if state is None:
            return False
        extra = max(0, state.open + state.connecting + 1 - state.commitment())
        return extra <= self.budget - self.committed

    def running(self, worker: W) -> int | None:
        """The item the worker runs or starts next, if it may start one."""
        state = self._workers.get(worker)
        return state.queue[0] if state and state.granted else None

    def settled(self) -> bool:
        """Whether no worker waits for anything (``holders.settled``): a completion then
        only frees room that nobody wants."""
        refill = GO_AHEAD_SECONDS * GO_AHEAD_REFILL
        return all(settled(s, self.seconds_of, refill) for s in self._workers.values())

    @property
    def committed(self) -> int:
        return sum(s.commitment() for s in self._workers.values())

    @property
    def open(self) -> int:
        return sum(s.open for s in self._workers.values())

    @property
    def peak_open(self) -> int:
        return self._peak_open

    def note_peak(self) -> None:
        """Take the open connections into the run's peak (before each decision)."""
        self._peak_open = max(self._peak_open, self.open)

    def describe(self, worker: W) -> str:
        """The worker's admission state in one short line, for ``--debug`` logs."""
        return self._workers[worker].describe()

    # -- decisions ----------------------------------------------------------------------

    def admit(
        self,
        actions: list[AdmissionAction],
        *,
        first: W | None = None,
        lane: LaneAhead[W] | None = None,
        can_start: Callable[[W], bool] | None = None,
    ) -> None:
        """Answer blocked requests first, then give goes (``first``'s before the others':
        the serial lane is the run's critical path); whatever does not fit keeps its
        room reserved, so later, smaller items cannot starve it. Then relieve what is
        blocked (rules 5 and 6).

        ``lane``: the serial lane's items still to start (``critical``): room for its
        next test is kept from other workers' goes. ``can_start``: whether a worker
        could start its next item if it had the go (xdist enters an item only once the
        worker holds the next one or a shutdown); one that cannot reserves nothing."""
        hand_out = AdmissionPass(
            self._workers, self.limits, self.need_of, self.seconds_of, self._answer, self._next
        )
        hand_out.answer_requests(actions)
        if not hand_out.draining:
            can = can_start or (lambda _: True)
            path = critical_path(lane, self._workers, self.need_of, self.budget, can)
            hand_out.give_goes(actions, first, path, can)
        if hand_out.blocked:
            self._relieve(hand_out.blocked, actions, keeping=hand_out.keeping)
        elif hand_out.growing:
            # A head waits for the budget to grow, which other runs' shares make: idle
            # connections held here would keep this run's share, and so their room.
            self._ask_idle_back(actions)
        elif hand_out.gap_crowded:
            # Ahead of the lane's next gap, for the test given it (``_crowds_gap``).
            self._ask_idle_back(actions, keeping=hand_out.gap_crowded)
        elif self._lowered_under:
            # Over a lowered budget with nobody waiting: idle connections given back
            # bring the run under it sooner (another run may be waiting for them).
            self._lowered_under = hand_out.room < 0
            if self._lowered_under:
                self._ask_idle_back(actions)
        self._went = self._went or any(isinstance(action, Go) for action in actions)

    def _answer(self, request: Request, answer: Answer, actions: list[AdmissionAction]) -> None:
        worker: W = request.worker  # type: ignore[assignment]
        state = self._workers[worker]
        if (
            request.kind is RequestKind.RERUN
            and request.item is not None
            and answer is Answer.GRANTED
        ):
            state.regrant(request.item, self.need_of(request.item), request.want)
        state.answer(request, refused=answer is Answer.REFUSED)
        if answer is Answer.OVER_BUDGET:
            self._overrun(worker, state.floor, request.item)
        actions.append(Grant(worker, request.request, answer))

    def _overrun(self, worker: W, need: int, index: int | None) -> None:
        index = -1 if index is None else index
        alone = all(s.open == 0 for w, s in self._workers.items() if w != worker)
        if not any(o.index == index for o in self.overruns):
            holders = self._workers.items()
            outside = sorted((s.open for _, s in holders if s.open and not s.granted), reverse=True)
            in_tests = sum(s.open for w, s in holders if w != worker and s.granted)
            self.overruns.append(Overrun(index, need, self.budget, alone, tuple(outside), in_tests))

    def _relieve(
        self, blocked: list[W], actions: list[AdmissionAction], *, keeping: Iterable[W] = ()
    ) -> None:
        """Free room for blocked workers: ask for idle connections back (but not from
        those ``keeping`` them for the item they were just let start); when nothing can
        free room any more, break the deadlock (see ``Answer``)."""
        self._ask_idle_back(actions, keeping)
        if can_progress(self._workers, blocked):
            return
        waiting = waiting_requests(self._workers.values())
        connects = [
            r
            for r in waiting
            if r.kind is RequestKind.CONNECT
            and not r.background
            and not self._workers[r.worker].rerunning  # type: ignore[index]
        ]
        victim = connects[-1].worker if connects else None
        limits = self.limits
        # Within the run, wait-die once the budget can grow no more; while it can
        # (another run may give room back), the run's request for it is served in the
        # ticket queue, and the runs decide there who gives way (``limits.give_way``).
        if victim is not None and (
            limits.give_way
            or (
                self.budget >= limits.ceiling
                and any(s.commitment() > 0 for w, s in self._workers.items() if w != victim)
            )
        ):
            # Wait-die: the youngest waiting test gives way (all its waiting threads);
            # it fails on a connection-limit error and is rerun alone.
            for request in [r for r in connects if r.worker == victim]:
                self._answer(request, Answer.REFUSED, actions)
        elif self.budget < limits.ceiling or limits.give_way or not limits.may_pass:
            # The budget will grow, or another run is served first, or the server has
            # no room past the budget yet: nothing (a rerun, a head alone) goes past it.
            return
        elif waiting:
            # Alone, or only reruns are waiting: nothing else will ever free room.
            self._answer(waiting[0], Answer.OVER_BUDGET, actions)
        else:
            first = blocked[0]
            state = self._workers[first]
            index = state.queue[0]
            self._overrun(first, self.need_of(index), index)
            state.start_alone(self.need_of(index))
            actions.append(Go(first, index))

    def _ask_idle_back(self, actions: list[AdmissionAction], keeping: Iterable[W] = ()) -> None:
        """Ask every worker holding idle connections it may give back (once per answer)."""
        kept = set(keeping)
        for worker, state in self._workers.items():
            if state.idle > state.stuck_idle and not state.release_sent and worker not in kept:
                state.release_sent = True
                actions.append(Release(worker))

    def _next(self) -> int:
        self._counter += 1
        return self._counter
