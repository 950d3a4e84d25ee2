"""Admission: which queued item may start, and which blocked connect may proceed, so the
connections open stay within the budget (``docs/design.md``, "Admission").

Pure logic with no xdist or database imports. It knows each worker's queue (the items
handed to it, in run order) but not how they were chosen: placement (``placement``) hands
items out, admission lets them start. What it knows of each worker is kept in
``holders``; the decisions are here.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from pytest_poolaware.planning.critical import CriticalPath, LaneAhead, LaneWaits, critical_path
from pytest_poolaware.planning.holders import (
    Holder,
    Request,
    RequestKind,
    can_progress,
    go_order,
    seconds_ahead,
    settled,
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
        return max((s.wants(self.need_of) for s in self._workers.values()), default=0)

    def rerun_waits(self) -> bool:
        """Whether a rerun waits mid-test for a connection: it never gives way (it has no
        third attempt), so a run sharing the server asks to be served first."""
        return any(
            s.rerunning and any(r.kind is RequestKind.CONNECT for r in s.requests)
            for s in self._workers.values()
        )

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
        hand_out = _Pass(
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
        if victim is not None and (
            limits.give_way
            or any(s.commitment() > 0 for w, s in self._workers.items() if w != victim)
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


class _Pass(Generic[W]):
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
        the run drains towards that. On a shared server it also waits while another run
        is served first: that run's test may wait for the room the rerun would take, and
        a rerun never gives way (it has no third attempt), so neither would go on."""
        if not self.draining and not self._limits.give_way and not self._others_busy(worker):
            request.want = min(request.want, self._budget)  # it may have shrunk
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
