"""One admission pass (``docs/design.md``, "Admission", rules 1 to 4): which blocked
connect is granted and which queued item gets its go, within the budget; who does not
fit is blocked, and keeps its room reserved.

Pure logic with no xdist or database imports. ``admission.Admission`` keeps what is
known of each worker between passes (``holders``) and runs one pass per decision.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from pytest_poolaware.planning.critical import CriticalPath, LaneWaits
from pytest_poolaware.planning.holders import (
    Holder,
    Request,
    RequestKind,
    go_order,
    seconds_ahead,
    waiting_requests,
)
from pytest_poolaware.shared.limits import Limits
from pytest_poolaware.shared.protocol import Answer

W = TypeVar("W", bound=Hashable)


@dataclass(frozen=True)
class Go:
    """The worker may start this item."""

    worker: Hashable
    index: int


@dataclass(frozen=True)
class Grant:
    """Answer a blocked request."""

    worker: Hashable
    request: int
    answer: Answer = Answer.GRANTED


@dataclass(frozen=True)
class Release:
    """Ask the worker to close its idle pooled connections."""

    worker: Hashable


AdmissionAction = Go | Grant | Release

#: When the budget is smaller than the workers with work, a head that waits for room
#: lets the workers that hold connections have this many goes within them first: each
#: go handed to a worker without connections makes another give its connections back
#: (a persistent connection such as Django's is closed and opened again: tens of
#: milliseconds), which costs more than short tests take. Run in turns of this many
#: goes instead, the head still starts within them.
HANDOVER_AFTER_GOES = 8
#: A worker holding connections is given goes ahead of time (for the items after the one
#: it runs, saving a round trip between tests) only up to this many expected seconds of
#: them: a go cannot be taken back, and it pins the worker's connections, so a head that
#: starts waiting for room waits for them all. Measured on
#: a suite of 0.1 s tests beside 6-connection ones: with up to 2 s of goes ahead, the
#: 6-connection test waited 1.2 s for light tests to drain.
GO_AHEAD_SECONDS = 0.25
#: Goes ahead are topped up (to ``GO_AHEAD_SECONDS``) only once fewer than this share of
#: it is left, so that most completions of quick tests need no plan (``settled``).
GO_AHEAD_REFILL = 0.5


class AdmissionPass(Generic[W]):
    """One pass of rules 1 to 4 (``docs/design.md``, "Admission"): the budget left over
    the workers' commitments goes to blocked requests first, then to queued items; who
    does not fit is blocked, and keeps its room reserved.

    ``answer`` records a granted request (``Admission._answer``); ``tick`` numbers the
    order in which heads started waiting.
    """

    def __init__(
        self,
        holders: Mapping[W, Holder],
        limits: Limits,
        need_of: Callable[[int], int],
        seconds_of: Callable[[int], float],
        answer: Callable[[Request, Answer, list[AdmissionAction]], None],
        tick: Callable[[], int],
    ) -> None:
        self._holders = holders
        self._seconds_of = seconds_of
        self._limits = limits
        budget = self._budget = limits.budget
        self._need_of = need_of
        self._answer = answer
        self._tick = tick
        #: Each worker's commitment, raised by what this pass grants it.
        self.committed = {w: s.commitment() for w, s in holders.items()}
        #: What is left of the budget (below 0: over a budget lowered below the commitments).
        self.room = budget - sum(self.committed.values())
        #: Workers whose request or head item does not fit, in the order found.
        self.blocked: list[W] = []
        #: A rerun waits or was granted: nothing new starts, so the run drains towards it.
        self.draining = False
        #: Over a budget lowered below the commitments before anything was reserved.
        self._lowered = self.room < 0
        #: Fewer connections than workers with work: they take turns (``_hands_over_later``).
        self._scarce = budget < sum(1 for s in holders.values() if s.queue)
        #: A running test's connect is blocked (rules 1 and 2).
        self._connect_blocked = False
        #: The serial lane's worker (``give_goes``).
        self._first: W | None = None
        #: Workers let start within their connections while a head waits: they keep them.
        self.keeping: list[W] = []
        #: A head waits for the budget to grow (``_grows_for``).
        self.growing = False
        #: The lane's and its gap's workers, when other workers' idle connections would
        #: keep the test given the lane's next gap out of it (``_crowds_gap``); else ().
        self.gap_crowded: tuple[W, ...] = ()
        #: Of the room the only waiting head reserved, what it cannot have before a running
        #: test ends (``_pinned``): a go that fits in it as well delays the head not at all.
        self.pinned = 0

    def answer_requests(self, actions: list[AdmissionAction]) -> None:
        """Rules 1 to 3: connect requests first, oldest first, then reruns."""
        for request in waiting_requests(self._holders.values()):
            worker: W = request.worker  # type: ignore[assignment]
            if request.kind is RequestKind.RERUN:
                self._answer_rerun(worker, request, actions)
                continue
            state = self._holders[worker]
            want = state.open + state.connecting + 1
            extra = max(0, want - self.committed[worker])
            if extra <= max(self.room, 0):
                self.committed[worker] = max(self.committed[worker], want)
                self._answer(request, Answer.GRANTED, actions)
            else:
                self.blocked.append(worker)
                self._connect_blocked = True
            self.room -= extra

    def _answer_rerun(self, worker: W, request: Request, actions: list[AdmissionAction]) -> None:
        """A rerun waits until it has the run to itself; meanwhile nothing new starts, so
        the run drains towards that. On a shared server it also waits for the room it
        asks for, as far as the budget may grow (``Limits.ceiling``): its first attempt
        gave way, so its need may not be known, and started on a budget shrunk by other
        runs it would grow mid-test and could wait on another run's rerun, neither able
        to give way (three cold runs: all three reruns waited until their gates timed
        out). Its run's request, first in the ticket queue once it is the oldest, brings
        that room."""
        want = min(request.want, self._limits.ceiling)
        if (
            not self.draining
            and not self._limits.give_way
            and not self._others_busy(worker)
            and want <= self._budget
        ):
            request.want = want
            self.committed[worker] = max(self.committed[worker], request.want)
            self._answer(request, Answer.GRANTED, actions)
        else:
            self.blocked.append(worker)
        self.draining = True

    def _others_busy(self, worker: W) -> bool:
        """Whether any other worker holds connections or runs an item."""
        return any(
            s.open > 0 or (s.granted and not s.requests)
            for w, s in self._holders.items()
            if w != worker
        )

    def give_goes(
        self,
        actions: list[AdmissionAction],
        first: W | None,
        lane: CriticalPath[W] | None = None,
        can_start: Callable[[W], bool] = lambda _: True,
    ) -> None:
        """Rule 4: ``first``'s queue (the serial lane's), then waiting heads, then by
        arrival; each worker's queued items start in order while their expected needs
        fit, the others' in what is left after the room kept for the lane's next test."""
        # Once something waits for room, nothing else starts unless it fits in what is
        # left after that reservation, even within its worker's commitment: otherwise a
        # worker streaming light items never lets its commitment drop.
        # A budget lowered below what is committed (``set_budget``) holds every new go,
        # even one within its worker's commitment, until commitments drop.
        reserved = bool(self.blocked) or self.room < 0
        self._first = first
        order = go_order(self._holders, first)
        gap = None if lane is None or not lane.between else lane.gap
        if gap is not None:  # the lane is between tests: the gap's test goes first
            order.remove(gap)
            order.insert(0, gap)
        waiting = {w for w, s in self._holders.items() if s.waiting_since and not s.granted}
        for worker in order:
            waits = self._waits(worker, lane, gap, can_start(worker))
            if waiting - {worker}:
                # Another worker's head waits: no go ahead of time here, which would keep
                # this worker's commitment (its idle connections) held past its item.
                waits = replace(waits, ahead=False)
            reserved = self._give_goes_to(worker, reserved, actions, waits)
        if lane is not None and lane.gap is not None and self._crowds_gap(lane, lane.gap):
            self.gap_crowded = (lane.worker, lane.gap)

    def _crowds_gap(self, lane: CriticalPath[W], gap: W) -> bool:
        """Whether the test given the lane's next gap would not fit when the lane's
        current test ends, for what the other workers hold: their idle connections are
        asked back now, ahead of that gap. Found on the inventory suite: a light worker
        kept 5 idle connections of its previous 6-connection test, the 12-connection
        test missed the gap, and its worker idled one more lane test (0.65 s)."""
        if lane.between:
            return False
        others = sum(c for w, c in self.committed.items() if w not in (lane.worker, gap))
        return lane.gap_need + others > self._budget

    def _waits(
        self, worker: W, lane: CriticalPath[W] | None, gap: W | None, can_start: bool
    ) -> LaneWaits[W]:
        """How the worker's items are let go, given the lane (the lane's worker goes
        first, or right after the gap's test: its commitment is final for the others)."""
        if lane is None:
            return LaneWaits(None, can_start, 0, 0)
        if worker == gap:
            # Its head only: what follows it on that worker is off the critical path.
            return LaneWaits(None, can_start, 0, 0, spare=lane.spare)
        if worker == lane.worker:
            # With a gap wanted, the lane's next test gets no go before its current one
            # ends (within its commitment, it would close the gap).
            return LaneWaits(None, can_start, 0, 0, ahead=lane.gap is None)
        gap_worker = 0 if lane.gap is None else self.committed[lane.gap]
        return LaneWaits(lane, can_start, self.committed[lane.worker], gap_worker)

    def _give_goes_to(
        self, worker: W, reserved: bool, actions: list[AdmissionAction], waits: LaneWaits[W]
    ) -> bool:
        """Goes for the worker's queued items while they fit; returns whether room is
        reserved now (its head did not fit, and waits for room, not for a gap)."""
        state = self._holders[worker]
        if state.granted == len(state.queue):
            return reserved  # every queued item has its go: nothing to decide
        ahead = seconds_ahead(state, self._seconds_of)
        limit = GO_AHEAD_SECONDS if ahead < GO_AHEAD_SECONDS * GO_AHEAD_REFILL else 0.0
        while state.granted < len(state.queue) and not state.requests:
            index = state.queue[state.granted]
            raised = max(self.committed[worker], self._need_of(index))
            extra = raised - self.committed[worker]
            starts_now = state.granted == 0
            if not starts_now and (not waits.ahead or (raised and ahead >= limit)):
                break
            keep = waits.keep(state.queue, index)
            if self._may_start(worker, extra, starts_now=starts_now, reserved=reserved, keep=keep):
                if starts_now:
                    state.waiting_since = state.overtaken = 0
                self.room -= extra
                self.committed[worker] = raised
                state.start(self._need_of(index))
                actions.append(Go(worker, index))
                ahead += 0.0 if starts_now else self._seconds_of(index)
                if waits.spare is not None:
                    break
                continue
            gap_shut = waits.spare is not None and extra > self.room + waits.spare
            need = self._need_of(index)
            if starts_now and (
                gap_shut or self._grows_for(need) or not waits.for_room(need, self._budget)
            ):
                state.waiting_since = state.waiting_since or self._tick()
            elif starts_now:
                self.room -= extra
                # Held back by the room kept for the lane, it is blocked too: the idle
                # connections asked back (its own maybe) make that room.
                if extra > 0 or self.room < 0 or keep > 0:
                    self.blocked.append(worker)
                    reserved = True
                    state.waiting_since = state.waiting_since or self._tick()
                    # Never more than it reserved: a backfilled go stays within the budget.
                    self.pinned = min(self._pinned(worker, raised), extra) if keep == 0 else 0
            break
        return reserved

    def _grows_for(self, need: int) -> bool:
        """Whether a head needing more than the whole budget waits for the budget to grow
        (another run sharing the server gives back its share): it reserves nothing
        meanwhile, since no draining of this run's tests can make it room; the run's other
        tests go on within the budget. Once the budget can grow no more, it reserves, and
        runs alone past the budget when nothing else frees room (rule 6)."""
        grows = self._budget < need and self._budget < self._limits.ceiling
        self.growing = self.growing or grows
        return grows

    def _may_start(
        self, worker: W, extra: int, *, starts_now: bool, reserved: bool, keep: int
    ) -> bool:
        """``_fits``, or the worker's turn with its connections (``_hands_over_later``)."""
        if self._fits(extra, starts_now=starts_now, reserved=reserved, keep=keep):
            return True
        if starts_now and self.pinned and extra <= self.room + self.pinned - keep:
            # Backfill: it fits beside the waiting head once the test the head waits for
            # ends, so it delays the head not at all; its idle connections stay with it.
            self.keeping.append(worker)
            return True
        if not starts_now or not self._hands_over_later(worker, extra, keep):
            return False
        self.keeping.append(worker)
        for waiting in self.blocked:
            self._holders[waiting].overtaken += 1
        return True

    def _hands_over_later(self, worker: W, extra: int, keep: int) -> bool:
        """Whether the worker's head starts within the connections it holds although a
        head waits for room: the budget is smaller than the workers with work, so they
        take turns, each keeping its connections for ``HANDOVER_AFTER_GOES`` goes rather
        than handing them over at every test. Never ahead of the serial lane, a running
        test's connect, a budget lowered below the commitments or the room kept for
        the lane."""
        if extra or keep or self._lowered or self._connect_blocked or not self._scarce:
            return False
        if not self.blocked or self._first in self.blocked or worker in self.blocked:
            return False
        return all(self._holders[w].overtaken < HANDOVER_AFTER_GOES for w in self.blocked)

    def _pinned(self, head: W, raised: int) -> int:
        """Room the head (raising its worker's commitment to ``raised``) cannot have
        before a running test ends, when it is the only thing waiting: the largest need
        a go'ed test holds, if the head does not fit beside it even with every other
        worker empty. Whatever fits beside the head once that test ends may start
        meanwhile (backfill): the head waits for that test anyway. Found on a suite
        whose 12-connection test ran in a gap of the serial lane: the lane's next test
        (7) reserved its room, and light tests on two workers waited 0.6 s each
        although 12 + 7 > 15 kept the lane waiting for the 12 alone. (0: not so.)"""
        if self._connect_blocked or len(self.blocked) > 1:
            return 0
        holding = (s.granted_need() for w, s in self._holders.items() if w != head and s.granted)
        most = max(holding, default=0)
        return most if most + raised > self._budget else 0

    def _fits(self, extra: int, *, starts_now: bool, reserved: bool, keep: int = 0) -> bool:
        """Whether an item that raises its worker's commitment by ``extra`` may start:
        with room reserved, only in what is left; else within its worker's commitment,
        or in what is left when it is the worker's next item to start. ``keep``: room
        kept for the serial lane's next test, which this item must leave free."""
        if reserved or extra == 0:
            # Within its commitment it takes no new room, but holds what it has (idle
            # connections included) until it ends: the lane's room is checked all the
            # same (``keep`` is 0 off the lane's horizon; ``room`` is >= 0 unreserved).
            return extra <= self.room - keep
        return starts_now and extra <= self.room - keep
