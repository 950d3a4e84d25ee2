"""Scheduling decisions for ``--dist poolaware``: lanes, the connection budget, ordering.

Pure logic with no xdist or SQLAlchemy imports: the xdist adapter feeds it events and
carries out the actions it returns, so every decision can be unit-tested directly.

Vocabulary:

* a worker's *queue* holds the items sent to it and not completed yet, in run order;
* a *go* is the permission for one queued item to start (items start only in queue
  order, so the go'ed items always form a prefix of the queue);
* a worker's *commitment* is what it may hold open: the larger of its live open
  connections and the expected need of each item it may start;
* a *request* is a worker blocked mid-test, asking for one more connection (or for
  room to rerun a test that hit the server's limit).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

W = TypeVar("W", bound=Hashable)

#: A worker is topped up when it holds fewer items than this (xdist runs an item only
#: once the worker holds the next one, so fewer than two would stall it).
MIN_QUEUE = 2
#: At most this many items are sent to one worker ahead of time.
MAX_QUEUE = 64
#: Queue length aims at pending / (workers * QUEUE_SPLIT), as xdist's load does.
QUEUE_SPLIT = 4
#: Known-duration items are queued ahead only up to this many seconds of work, so a
#: long test is not stuck behind others on a busy worker.
QUEUE_SECONDS = 2.0


class Lane(enum.Enum):
    """Where an item runs: the single serial lane, or anywhere in the fan-out."""

    SERIAL = "serial"
    FANOUT = "fanout"


@dataclass(frozen=True)
class Test:
    """What the core knows of one collected item."""

    lane: Lane
    #: Peak connections checked out at once, measured by an earlier run; None if unknown.
    need: int | None = None
    #: Seconds it took in an earlier run; None if unknown.
    duration: float | None = None


@dataclass(frozen=True)
class Send:
    """Send these items to the worker (xdist ``runtests``)."""

    worker: Hashable
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Shutdown:
    """No more items will ever go to this worker."""

    worker: Hashable


@dataclass(frozen=True)
class Go:
    """The worker may start this item."""

    worker: Hashable
    index: int


@dataclass(frozen=True)
class Grant:
    """Answer a blocked request; ``over_budget`` when granted only to avoid a deadlock."""

    worker: Hashable
    request: int
    over_budget: bool = False


@dataclass(frozen=True)
class Release:
    """Ask the worker to close its idle pooled connections."""

    worker: Hashable


Action = Send | Shutdown | Go | Grant | Release


@dataclass(frozen=True)
class Overrun:
    """An item was let past the budget: it needed more than the room there was."""

    index: int
    need: int
    budget: int
    alone: bool


@dataclass
class _Request:
    request: int
    #: Connections the worker wants to hold once granted (its open count + 1, or a
    #: rerun's measured need).
    want: int
    order: int


@dataclass
class _Worker:
    order: int
    queue: deque[int] = field(default_factory=deque)
    granted: int = 0  # length of the go'ed prefix of ``queue``
    open: int = 0
    idle: int = 0
    shut: bool = False
    request: _Request | None = None
    release_sent: bool = False


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


class Planner(Generic[W]):
    """Decides which worker runs what, and when, so open connections stay within budget.

    Called by the xdist adapter (``scheduler.PoolAwareScheduling``) on the controller's
    main thread; every method returns the actions to carry out, in order.
    """

    def __init__(self, budget: int, *, unknown_need: int = 1) -> None:
        if budget < 1:
            raise ValueError(f"budget must be positive, got {budget}")
        self.budget = budget
        self.unknown_need = unknown_need
        self._tests: list[Test] = []
        self._loaded = False
        self._serial: deque[int] = deque()
        self._fanout: deque[int] = deque()
        self._workers: dict[W, _Worker] = {}
        self._serial_worker: W | None = None
        self._completed: set[int] = set()
        self._needs: dict[int, int] = {}
        self._counter = 0
        self._peak_open = 0
        self.overruns: list[Overrun] = []

    # -- inputs -------------------------------------------------------------------------

    def load(self, tests: Sequence[Test]) -> list[Action]:
        """Take the collection (once): lanes, then longest-first order in the fan-out."""
        assert not self._loaded, "collection loaded twice"
        self._loaded = True
        self._tests = list(tests)
        self._serial = deque(i for i, t in enumerate(tests) if t.lane is Lane.SERIAL)
        fanout = [i for i, t in enumerate(tests) if t.lane is Lane.FANOUT]
        # Unmeasured items first (to learn about them early), then longest first.
        fanout.sort(key=lambda i: (tests[i].duration is not None, -(tests[i].duration or 0.0)))
        self._fanout = deque(fanout)
        return self._plan()

    def add_worker(self, worker: W) -> list[Action]:
        """A worker is ready (initially, or replacing a crashed one)."""
        assert worker not in self._workers
        self._workers[worker] = _Worker(order=self._next())
        return self._plan() if self._loaded else []

    def remove_worker(self, worker: W) -> tuple[int | None, list[Action]]:
        """A worker is gone; returns the item it was running, if it crashed mid-item.

        The head of its queue counts as the running item (as in xdist's ``load``); the
        rest goes back to the front of its lane, in order.
        """
        state = self._workers.pop(worker)
        if self._serial_worker == worker:
            self._serial_worker = None
        crashed: int | None = None
        if state.queue:
            crashed = state.queue.popleft()
            self._completed.add(crashed)
            for index in reversed(state.queue):
                self._lane_of(index).appendleft(index)
        return crashed, self._plan()

    def requeue(self, index: int) -> list[Action]:
        """Run an item again (xdist ``mark_test_pending``, used by crash handlers)."""
        self._completed.discard(index)
        self._lane_of(index).appendleft(index)
        return self._plan()

    def counts(self, worker: W, open_: int, idle: int) -> list[Action]:
        """Live connection counts measured inside a worker."""
        state = self._workers.get(worker)
        if state is None:
            return []
        state.open, state.idle = open_, idle
        if idle == 0:
            state.release_sent = False
        return self._plan()

    def completed(
        self, worker: W, index: int, *, need: int | None = None, duration: float | None = None
    ) -> list[Action]:
        """The worker finished an item; ``need`` is its measured peak, if measured."""
        state = self._workers[worker]
        state.queue.remove(index)
        state.granted = max(0, state.granted - 1)
        self._completed.add(index)
        if need is not None:
            self._needs[index] = need
        if duration is not None:
            self._tests[index] = Test(self._tests[index].lane, self.need_of(index), duration)
        return self._plan()

    def request(self, worker: W, request: int, want: int | None = None) -> list[Action]:
        """A worker is blocked until it may hold ``want`` connections (default: one more)."""
        state = self._workers[worker]
        state.request = _Request(request, state.open + 1 if want is None else want, self._next())
        return self._plan()

    # -- queries ------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def has_pending(self) -> bool:
        """Items not yet completed: pending in a lane or queued on a worker."""
        return bool(self._serial or self._fanout or any(s.queue for s in self._workers.values()))

    @property
    def tests_finished(self) -> bool:
        return self._loaded and not self.has_pending

    def need_of(self, index: int) -> int:
        """Expected peak connections of an item: measured, learned, or assumed."""
        if index in self._needs:
            return self._needs[index]
        need = self._tests[index].need
        return self.unknown_need if need is None else need

    def lane_of(self, index: int) -> Lane:
        return self._tests[index].lane

    def running(self, worker: W) -> int | None:
        """The item the worker runs or starts next, if it may start one."""
        state = self._workers.get(worker)
        return state.queue[0] if state and state.granted else None

    def statistics(self) -> Statistics:
        return Statistics(
            budget=self.budget,
            committed=sum(self._commitment(s) for s in self._workers.values()),
            open=sum(s.open for s in self._workers.values()),
            peak_open=self._peak_open,
            pending_serial=len(self._serial),
            pending_fanout=len(self._fanout),
            in_flight=sum(len(s.queue) for s in self._workers.values()),
            completed=len(self._completed),
            overruns=tuple(self.overruns),
        )

    # -- decisions ----------------------------------------------------------------------

    def _plan(self) -> list[Action]:
        actions: list[Action] = []
        self._peak_open = max(self._peak_open, sum(s.open for s in self._workers.values()))
        if not self._loaded:
            return actions
        self._fill_queues(actions)
        self._admit(actions)
        return actions

    def _fill_queues(self, actions: list[Action]) -> None:
        serial_worker = self._pick_serial_worker()
        live = [w for w, s in self._workers.items() if not s.shut]
        fanout_workers = [w for w in live if w != serial_worker] or live
        for worker in live:
            state = self._workers[worker]
            if worker == serial_worker:
                lane = self._serial if self._serial else self._fanout
                sharing = 1 if self._serial else len(live)
            else:
                lane, sharing = self._fanout, len(fanout_workers)
            batch = self._take(lane, state, sharing)
            if batch:
                state.queue.extend(batch)
                actions.append(Send(worker, tuple(batch)))
            elif not lane and not (worker == serial_worker and self._serial):
                state.shut = True
                actions.append(Shutdown(worker))

    def _pick_serial_worker(self) -> W | None:
        """The serial lane keeps its worker; a new one is picked when it is gone."""
        serial_left = self._serial or (
            self._serial_worker is not None
            and any(
                self._tests[i].lane is Lane.SERIAL for i in self._workers[self._serial_worker].queue
            )
        )
        if not serial_left:
            self._serial_worker = None
            return None
        if self._serial_worker is None:
            candidates = [
                (len(s.queue), s.order, w) for w, s in self._workers.items() if not s.shut
            ]
            if candidates:
                self._serial_worker = min(candidates, key=lambda c: (c[0], c[1]))[2]
        return self._serial_worker

    def _take(self, lane: deque[int], state: _Worker, sharing: int) -> list[int]:
        """Items to add to a worker's queue, load-style: big batches early, small late."""
        if len(state.queue) >= MIN_QUEUE and len(state.queue) > self._target(lane, sharing) // 2:
            return []
        target = self._target(lane, sharing)
        seconds = sum(self._tests[i].duration or 0.0 for i in state.queue)
        batch: list[int] = []
        while lane and len(state.queue) + len(batch) < target:
            if len(state.queue) + len(batch) >= MIN_QUEUE and seconds >= QUEUE_SECONDS:
                break
            index = lane.popleft()
            batch.append(index)
            seconds += self._tests[index].duration or 0.0
        return batch

    @staticmethod
    def _target(lane: deque[int], sharing: int) -> int:
        return max(MIN_QUEUE, min(MAX_QUEUE, len(lane) // (max(1, sharing) * QUEUE_SPLIT)))

    def _commitment(self, state: _Worker) -> int:
        needs = [self.need_of(i) for i in list(state.queue)[: state.granted]]
        held = max([state.open, *needs])
        if state.request is not None:
            # A blocked request is counted once granted; until then it only waits.
            return held
        return held

    def _admit(self, actions: list[Action]) -> None:
        """Grant blocked requests first, then goes; what does not fit reserves its room."""
        committed = {w: self._commitment(s) for w, s in self._workers.items()}
        room = self.budget - sum(committed.values())
        blocked: list[W] = []

        waiting = sorted(
            (s.request.order, w) for w, s in self._workers.items() if s.request is not None
        )
        for _, worker in waiting:
            state = self._workers[worker]
            assert state.request is not None
            extra = max(0, state.request.want - committed[worker])
            if extra <= room:
                room -= extra
                committed[worker] += extra
                self._grant(worker, actions, over_budget=False)
            else:
                room -= extra
                blocked.append(worker)

        for worker in self._go_order():
            state = self._workers[worker]
            while state.granted < len(state.queue) and state.request is None:
                index = state.queue[state.granted]
                raised = max(committed[worker], self.need_of(index))
                extra = raised - committed[worker]
                if extra == 0 or (state.granted == 0 and extra <= room):
                    room -= extra
                    committed[worker] = raised
                    state.granted += 1
                    actions.append(Go(worker, index))
                    continue
                if state.granted == 0:
                    room -= extra
                    blocked.append(worker)
                break

        if blocked:
            self._relieve(blocked, actions)

    def _go_order(self) -> list[W]:
        """Serial lane first (it is the run's critical path), then by arrival."""
        return sorted(
            self._workers,
            key=lambda w: (w != self._serial_worker, self._workers[w].order),
        )

    def _grant(self, worker: W, actions: list[Action], *, over_budget: bool) -> None:
        state = self._workers[worker]
        assert state.request is not None
        if over_budget:
            index = state.queue[0] if state.queue else -1
            self.overruns.append(
                Overrun(index, state.request.want, self.budget, alone=self._alone(worker))
            )
        state.open = max(state.open, state.request.want)
        actions.append(Grant(worker, state.request.request, over_budget=over_budget))
        state.request = None

    def _alone(self, worker: W) -> bool:
        return all(s.open == 0 for w, s in self._workers.items() if w != worker)

    def _relieve(self, blocked: list[W], actions: list[Action]) -> None:
        """Free room for blocked workers: ask for idle connections back, or, when nothing
        else can ever free room, let the oldest blocked worker past the budget."""
        for worker, state in self._workers.items():
            if state.idle > 0 and not state.release_sent:
                state.release_sent = True
                actions.append(Release(worker))
        if self._can_progress(blocked):
            return
        first = blocked[0]
        state = self._workers[first]
        if state.request is not None:
            self._grant(first, actions, over_budget=True)
        else:
            index = state.queue[0]
            self.overruns.append(
                Overrun(index, self.need_of(index), self.budget, alone=self._alone(first))
            )
            state.granted = 1
            actions.append(Go(first, index))

    def _can_progress(self, blocked: list[W]) -> bool:
        """Whether some worker will free room without help: it is running an item, or it
        holds idle connections it was asked to release."""
        stuck = set(blocked)
        for worker, state in self._workers.items():
            if worker in stuck:
                continue
            if state.granted and state.request is None:
                return True
            if state.open > 0 and (state.release_sent or state.shut):
                return True
        return False

    # -- helpers ------------------------------------------------------------------------

    def _lane_of(self, index: int) -> deque[int]:
        return self._serial if self._tests[index].lane is Lane.SERIAL else self._fanout

    def _next(self) -> int:
        self._counter += 1
        return self._counter


def lanes_for(
    markers: Iterable[tuple[bool, bool]], *, unmarked_serial: bool, known: Callable[[int], bool]
) -> list[Lane]:
    """Lane per item from its (serial_only, parallel_safe) markers and the unmarked policy."""
    lanes = []
    for index, (serial, _parallel) in enumerate(markers):
        if serial:
            lanes.append(Lane.SERIAL)
        elif not _parallel and unmarked_serial and not known(index):
            lanes.append(Lane.SERIAL)
        else:
            lanes.append(Lane.FANOUT)
    return lanes
