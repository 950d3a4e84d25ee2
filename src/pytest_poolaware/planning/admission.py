"""Admission: which queued item may start, and which blocked connect may proceed, so the
connections open stay within the budget (``docs/design.md``, "Admission").

Pure logic with no xdist or database imports. It knows each worker's queue (the items
handed to it, in run order) but not how they were chosen: placement (``placement``) hands
items out, admission lets them start.
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from pytest_poolaware.shared.protocol import Answer

W = TypeVar("W", bound=Hashable)


@dataclass(frozen=True)
class Go:
    """The worker may start this item."""

    worker: Hashable
    index: int


class RequestKind(enum.Enum):
    #: One more connection, mid-test.
    CONNECT = "connect"
    #: Room to rerun a test that hit the server's limit (never refused).
    RERUN = "rerun"


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


@dataclass
class _Request:
    worker: Hashable
    request: int
    order: int
    kind: RequestKind
    #: For a rerun: the room it asks for (a connect request wants one more than held).
    want: int = 0
    #: The item asking (None: not known, or asked outside any item).
    item: int | None = None
    #: Opened by a pool in its own thread or task: delayed until there is room, never
    #: refused (the test would only see the pool time out).
    background: bool = False


@dataclass
class _Holder:
    """One worker as admission sees it: what it may start, holds and waits for."""

    order: int
    #: Items handed to it and not completed yet, in run order.
    queue: deque[int] = field(default_factory=deque)
    granted: int = 0  # length of the go'ed prefix of ``queue``
    #: Expected needs of the go'ed items, counted (kept up to date: hot path).
    granted_needs: Counter[int] = field(default_factory=Counter)
    open: int = 0
    idle: int = 0
    #: Connections granted to the running item: it may hold this many until it ends.
    floor: int = 0
    #: Connect requests granted whose connection has not shown up in ``open`` yet.
    connecting: int = 0
    #: The item ``floor`` and ``connecting`` were granted to. A worker may start its next
    #: item, and be granted connections for it, before the controller hears that the
    #: previous one completed: that completion must not wipe the newer grants.
    floor_item: int | None = None
    #: ``version`` of the last counts taken; older ones arriving late are ignored.
    version: int = -1
    #: Blocked requests, oldest first (threads of one test may each wait for one).
    requests: list[_Request] = field(default_factory=list)
    release_sent: bool = False
    #: Idle connections left after the worker last tried to release them (held by pools
    #: with connections checked out): not worth asking for again until an item ends.
    stuck_idle: int = 0
    #: Its running item is a rerun: its connects are never refused (no third attempt).
    rerunning: bool = False
    #: When its head item was first found not to fit (0: not waiting); oldest go first.
    waiting_since: int = 0

    def commitment(self) -> int:
        if any(r.kind is RequestKind.RERUN for r in self.requests):
            return self.open  # it starts nothing before its rerun is granted
        return max(self.open, self.floor, self.granted_need())

    def granted_need(self) -> int:
        """The largest expected need among the go'ed items."""
        return max(self.granted_needs, default=0)

    def start(self, need: int) -> None:
        """Its next queued item gets its go."""
        self.granted += 1
        self.granted_needs[need] += 1

    def take_counts(self, open_: int, idle: int, released: bool, version: int | None) -> bool:
        """See ``Admission.counts``."""
        stale = version is not None and version <= self.version
        if not stale:
            self.version = self.version if version is None else version
            if open_ > self.open:
                self.connecting = max(0, self.connecting - (open_ - self.open))
            self.open, self.idle = open_, idle
        if released:
            # The answer to a Release counts even when its numbers are not news: the
            # deadlock check waits for it.
            self.release_sent = False
            self.stuck_idle = self.idle
        elif stale:
            return False
        return True

    def counts_changed(self, open_: int, idle: int, version: int | None) -> bool:
        if version is not None and version <= self.version:
            return False
        return (self.open, self.idle) != (open_, idle)

    def complete(self, index: int, expected: int) -> None:
        """An item ended (``expected``: the need it was go'ed with)."""
        if self.queue.index(index) < self.granted:
            self.granted -= 1
            self.granted_needs[expected] -= 1
            if not self.granted_needs[expected]:
                del self.granted_needs[expected]
        self.queue.remove(index)
        if self.requests:
            # A request left unanswered (its wait timed out) is void once its item is over.
            self.requests = self.outliving({index})
        if self.floor_item not in self.queue:
            # What was granted belonged to this item (or to none still queued): free it.
            # Grants to a later item that already started stay until that one completes.
            self.free_grants()
        self.stuck_idle = 0

    def ask(self, request: _Request) -> None:
        """A request from one of its items (``item``: which, if still queued)."""
        item = request.item
        if item is None or item not in self.queue:
            request.item = self.queue[0] if self.queue else None
        else:
            self.forget_ended(item)
        if request.kind is RequestKind.RERUN:
            self.floor = 0  # the first attempt is over; what it was granted is free
        self.requests.append(request)

    def forget_ended(self, item: int) -> None:
        """``item`` asks: the items queued before it have ended (a worker runs its queue in
        order), even if their completion has not reached us yet. What was granted to them
        is free (their counts, sent before this request, are already taken), and requests
        of theirs left unanswered by a timeout are void."""
        ended = set(itertools.islice(self.queue, self.queue.index(item)))
        if not ended:
            return
        if self.floor_item in ended:
            self.free_grants()
        self.requests = self.outliving(ended)

    def free_grants(self) -> None:
        self.floor = 0
        self.connecting = 0
        self.floor_item = None
        self.rerunning = False

    def outliving(self, ended: set[int]) -> list[_Request]:
        """The requests that outlive the ``ended`` items: those of other items, and a
        pool's background connects (still waiting in the pool's thread: they pass to the
        worker's next item)."""
        kept = []
        for request in self.requests:
            if request.item in ended:
                if not request.background:
                    continue
                request.item = next((i for i in self.queue if i not in ended), None)
            kept.append(request)
        return kept

    def queued_before(self, later: int | None, earlier: int | None) -> bool:
        """Whether ``earlier`` sits before ``later`` in the queue."""
        if later not in self.queue or earlier not in self.queue:
            return False
        return self.queue.index(earlier) < self.queue.index(later)  # type: ignore[arg-type]

    def wants(self, need_of: Callable[[int], int]) -> int:
        """The most its head, held back by the budget, or its requests want (0: none)."""
        wants = [r.want for r in self.requests]
        if self.requests:
            wants.append(self.open + self.connecting + 1)
        if self.waiting_since and self.granted < len(self.queue):
            wants.append(need_of(self.queue[self.granted]))
        return max(wants, default=0)

    def describe(self) -> str:
        return (
            f"open={self.open} idle={self.idle} floor={self.floor} need={self.granted_need()} "
            f"go={self.granted}/{len(self.queue)} req={[r.kind.value for r in self.requests]}"
            f"{' rel' if self.release_sent else ''}"
        )


class Admission(Generic[W]):
    """Goes, grants, releases and wait-die for the run's budget.

    ``need_of`` gives an item's expected peak connections (measured, learned or
    assumed): the planner owns what is known of items.
    """

    def __init__(self, budget: int, *, need_of: Callable[[int], int]) -> None:
        if budget < 1:
            raise ValueError(f"budget must be positive, got {budget}")
        self.budget = budget
        #: What the budget may still grow to (``set_budget``).
        self._ceiling = budget
        self._give_way = False
        self.need_of = need_of
        #: The budget was lowered below what the workers hold: until they are back
        #: under it, idle connections are asked back even with nobody waiting.
        self._lowered_under = False
        self._workers: dict[W, _Holder] = {}
        self._counter = 0
        self._peak_open = 0
        self.overruns: list[Overrun] = []

    # -- inputs -------------------------------------------------------------------------

    def add_worker(self, worker: W) -> None:
        assert worker not in self._workers
        self._workers[worker] = _Holder(order=self._next())

    def remove_worker(self, worker: W) -> None:
        del self._workers[worker]

    def queued(self, worker: W, indices: Iterable[int]) -> None:
        """Items were handed to the worker (they start once they get a go)."""
        self._workers[worker].queue.extend(indices)

    def set_budget(
        self, budget: int, *, ceiling: int | None = None, give_way: bool = False
    ) -> bool:
        """The room changed mid-run (another run on the server took or gave back a
        share): what already started keeps what it was granted, new goes and grants
        follow the new budget. Returns whether anything changed.

        Lowered below what the workers hold, it lets nothing new start and grants no
        connect beyond what a running item was already granted, asks the workers for
        their idle connections back, and the run converges to it as items end.

        ``ceiling`` is what the budget can still grow to (another run giving its share
        back): an item that needs more than the budget but no more than that waits for
        it, rather than be let past the budget. With ``give_way`` (another run is being
        served first), running items blocked on a connection give way, as in a deadlock,
        rather than hold their connections while that run waits for them.
        """
        if budget < 1:
            raise ValueError(f"budget must be positive, got {budget}")
        ceiling = budget if ceiling is None else max(budget, ceiling)
        if (budget, ceiling, give_way) == (self.budget, self._ceiling, self._give_way):
            return False
        self.budget, self._ceiling, self._give_way = budget, ceiling, give_way
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
        state.ask(_Request(worker, request, self._next(), kind, want or 0, item, background))
        return True

    # -- queries ------------------------------------------------------------------------

    def largest_waiting_need(self) -> int:
        """The most connections an item held back by the budget expects (0: none is),
        so that a run sharing the server's room can ask for more of it."""
        return max((s.wants(self.need_of) for s in self._workers.values()), default=0)

    def running(self, worker: W) -> int | None:
        """The item the worker runs or starts next, if it may start one."""
        state = self._workers.get(worker)
        return state.queue[0] if state and state.granted else None

    def settled(self) -> bool:
        """Whether no worker waits for anything: no request, no item held back by the
        budget, every queued item already go'ed (a completion then only frees room that
        nobody wants)."""
        return all(
            not s.requests and s.granted == len(s.queue) and not s.waiting_since
            for s in self._workers.values()
        )

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

    def admit(self, actions: list[AdmissionAction], *, first: W | None = None) -> None:
        """Answer blocked requests first, then give goes (``first``'s before the others':
        the serial lane is the run's critical path); whatever does not fit keeps its
        room reserved, so later, smaller items cannot starve it."""
        committed = {w: s.commitment() for w, s in self._workers.items()}
        room = self.budget - sum(committed.values())
        blocked: list[W] = []

        draining = False
        for request in self._waiting():
            worker: W = request.worker  # type: ignore[assignment]
            state = self._workers[worker]
            if request.kind is RequestKind.RERUN:
                # A rerun waits until it has the run to itself; meanwhile nothing new
                # starts, so the run drains towards that.
                if not draining and not self._others_busy(worker):
                    request.want = min(request.want, self.budget)  # it may have shrunk
                    committed[worker] = max(committed[worker], request.want)
                    self._answer(request, Answer.GRANTED, actions)
                else:
                    blocked.append(worker)
                draining = True
                continue
            want = state.open + state.connecting + 1
            extra = max(0, want - committed[worker])
            if extra <= max(room, 0):
                committed[worker] = max(committed[worker], want)
                self._answer(request, Answer.GRANTED, actions)
            else:
                blocked.append(worker)
            room -= extra

        # Once something waits for room, nothing else starts unless it fits in what is
        # left after that reservation, even within its worker's commitment: otherwise a
        # worker streaming light items never lets its commitment drop.
        # A budget lowered below what is committed (``set_budget``) holds every new go,
        # even one within its worker's commitment, until commitments drop.
        reserved = bool(blocked) or room < 0
        for worker in [] if draining else _go_order(self._workers, first):
            state = self._workers[worker]
            while state.granted < len(state.queue) and not state.requests:
                index = state.queue[state.granted]
                raised = max(committed[worker], self.need_of(index))
                extra = raised - committed[worker]
                starts_now = state.granted == 0
                if extra <= room if reserved else (extra == 0 or (starts_now and extra <= room)):
                    if starts_now:
                        state.waiting_since = 0
                    room -= extra
                    committed[worker] = raised
                    state.start(self.need_of(index))
                    actions.append(Go(worker, index))
                    continue
                if starts_now:
                    room -= extra
                    if extra > 0 or room < 0:
                        blocked.append(worker)
                        reserved = True
                        state.waiting_since = state.waiting_since or self._next()
                break

        if blocked:
            self._relieve(blocked, actions)
        elif self._lowered_under:
            # Over a lowered budget with nobody waiting: idle connections given back
            # bring the run under it sooner (another run may be waiting for them).
            self._lowered_under = room < 0
            if self._lowered_under:
                self._ask_idle_back(actions)

    def _runs_freely(self, worker: W, state: _Holder) -> bool:
        """Whether the worker runs an item that waits for nothing: its end frees room."""
        return bool(state.granted) and not state.requests

    def _others_busy(self, worker: W) -> bool:
        """Whether any other worker holds connections or runs an item."""
        return any(
            s.open > 0 or (s.granted and not s.requests)
            for w, s in self._workers.items()
            if w != worker
        )

    def _waiting(self) -> list[_Request]:
        return _waiting(self._workers.values())

    def _answer(self, request: _Request, answer: Answer, actions: list[AdmissionAction]) -> None:
        worker: W = request.worker  # type: ignore[assignment]
        state = self._workers[worker]
        if answer is not Answer.REFUSED:
            if not state.queued_before(state.floor_item, request.item):
                state.floor_item = request.item  # grants follow the latest item asking
            if request.kind is RequestKind.RERUN:
                state.floor = max(state.floor, request.want)
                state.rerunning = True
            else:
                state.floor = max(state.floor, state.open + state.connecting + 1)
                state.connecting += 1
        if answer is Answer.OVER_BUDGET:
            self._overrun(worker, state.floor, request.item)
        actions.append(Grant(worker, request.request, answer))
        state.requests.remove(request)

    def _overrun(self, worker: W, need: int, index: int | None) -> None:
        index = -1 if index is None else index
        alone = all(s.open == 0 for w, s in self._workers.items() if w != worker)
        if not any(o.index == index for o in self.overruns):
            holders = self._workers.items()
            outside = sorted((s.open for _, s in holders if s.open and not s.granted), reverse=True)
            in_tests = sum(s.open for w, s in holders if w != worker and s.granted)
            self.overruns.append(Overrun(index, need, self.budget, alone, tuple(outside), in_tests))

    def _relieve(self, blocked: list[W], actions: list[AdmissionAction]) -> None:
        """Free room for blocked workers: ask for idle connections back; when nothing can
        free room any more, break the deadlock (see ``Answer``)."""
        self._ask_idle_back(actions)
        if self._can_progress(blocked):
            return
        waiting = self._waiting()
        connects = [
            r
            for r in waiting
            if r.kind is RequestKind.CONNECT
            and not r.background
            and not self._workers[r.worker].rerunning  # type: ignore[index]
        ]
        victim = connects[-1].worker if connects else None
        if victim is not None and (
            self._give_way
            or any(s.commitment() > 0 for w, s in self._workers.items() if w != victim)
        ):
            # Wait-die: the youngest waiting test gives way (all its waiting threads);
            # it fails on a connection-limit error and is rerun alone.
            for request in [r for r in connects if r.worker == victim]:
                self._answer(request, Answer.REFUSED, actions)
        elif self.budget < self._ceiling:
            return  # the budget will grow: wait for it rather than overrun it
        elif waiting:
            # Alone, or only reruns are waiting: nothing else will ever free room.
            self._answer(waiting[0], Answer.OVER_BUDGET, actions)
        else:
            first = blocked[0]
            state = self._workers[first]
            index = state.queue[0]
            self._overrun(first, self.need_of(index), index)
            state.granted = 1
            state.waiting_since = 0
            state.granted_needs = Counter({self.need_of(index): 1})
            actions.append(Go(first, index))

    def _ask_idle_back(self, actions: list[AdmissionAction]) -> None:
        """Ask every worker holding idle connections it may give back (once per answer)."""
        for worker, state in self._workers.items():
            if state.idle > state.stuck_idle and not state.release_sent:
                state.release_sent = True
                actions.append(Release(worker))

    def _can_progress(self, blocked: list[W]) -> bool:
        """Whether some worker will free room without help: it is running an item, or
        it is about to answer a request to release idle connections."""
        stuck = set(blocked)
        for worker, state in self._workers.items():
            if state.release_sent:
                return True
            if worker not in stuck and self._runs_freely(worker, state):
                return True
        return False

    def _next(self) -> int:
        self._counter += 1
        return self._counter


def _waiting(holders: Iterable[_Holder]) -> list[_Request]:
    """Connect requests first, oldest first: they come from running items, whose ending
    is what frees room; then reruns, which wait for the run to drain."""
    waiting = [r for s in holders for r in s.requests]
    return sorted(waiting, key=lambda r: (r.kind is RequestKind.RERUN, r.order))


def _go_order(holders: Mapping[W, _Holder], first: W | None) -> list[W]:
    """Waiting heads first, oldest first; then ``first``, then by arrival."""
    return sorted(
        holders,
        key=lambda w: (
            holders[w].waiting_since == 0,
            holders[w].waiting_since,
            w != first,
            holders[w].order,
        ),
    )
