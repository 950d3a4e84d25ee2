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
  room to rerun a test that hit the server's limit);
* a worker's *watermark* is the highest collection index handed to it: as with xdist's
  ``load``, a worker is never handed a test that comes before one it already holds or
  ran, so each worker runs its tests in collection order (tests returned by a crash are
  the exception, as with ``load``).
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from pytest_poolaware.fanout import FanoutPool, Placement, expected_seconds

W = TypeVar("W", bound=Hashable)

#: A worker is topped up when it holds fewer items than this (xdist runs an item only
#: once the worker holds the next one, so fewer than two would stall it).
MIN_QUEUE = 2
#: At most this many items are sent to one worker ahead of time.
MAX_QUEUE = 512
#: Queue length aims at pending / (workers * QUEUE_SPLIT), as xdist's load does.
QUEUE_SPLIT = 4
#: Known-duration items are queued ahead only up to this many seconds of work, so a
#: long test is not stuck behind others on a busy worker.
QUEUE_SECONDS = 2.0
#: The serial lane starts before every worker is up only when its first item is known
#: to take at least this long: a quick one would end, and be reported, in the middle of
#: xdist's start-up status lines, to save less time than it costs to read.
EARLY_START_SECONDS = 1.0


class Order(enum.Enum):
    """How each worker's tests are ordered (``poolaware_order``)."""

    #: As with ``--dist load``: each worker runs its tests in collection order; learned
    #: durations decide which worker runs which contiguous range of the collection.
    COLLECTION = "collection"
    #: Longest module first, from one shared queue: a worker may run a test before one
    #: that comes earlier in the collection, which exposes hidden order dependencies.
    DURATION = "duration"


class Lane(enum.Enum):
    """Where an item runs: the single serial lane, or anywhere in the fan-out."""

    SERIAL = "serial"
    FANOUT = "fanout"


@dataclass(frozen=True)
class ItemSpec:
    """What the core knows of one collected item."""

    lane: Lane
    #: Peak connections checked out at once, measured by an earlier run; None if unknown.
    need: int | None = None
    #: Seconds it took in an earlier run; None if unknown.
    duration: float | None = None
    #: Items sharing expensive fixtures (a module): kept together and in order.
    group: str = ""


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


class Answer(enum.Enum):
    """How a blocked request is answered."""

    GRANTED = "granted"
    #: Let past the budget: the test cannot fit even with the run to itself.
    OVER_BUDGET = "over_budget"
    #: Refused to break a deadlock: every worker holding connections was waiting for
    #: more. The test fails on a connection-limit error and the worker reruns it alone.
    REFUSED = "refused"


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
class _Worker:
    order: int
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
    shut: bool = False
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
    #: Highest collection index handed to it (returned items aside): it is handed only
    #: items above this, so it runs its tests in collection order.
    watermark: int = -1


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


class Planner(Generic[W]):
    """Decides which worker runs what, and when, so open connections stay within budget.

    Called by the xdist adapter (``scheduler.PoolAwareScheduling``) on the controller's
    main thread; every method returns the actions to carry out, in order.
    """

    def __init__(
        self, budget: int, *, unknown_need: int = 1, order: Order = Order.COLLECTION
    ) -> None:
        if budget < 1:
            raise ValueError(f"budget must be positive, got {budget}")
        self.budget = budget
        #: What the budget may still grow to (``set_budget``).
        self._ceiling = budget
        self._give_way = False
        self.unknown_need = unknown_need
        self.order = order
        self.placement = Placement.RANGES if order is Order.COLLECTION else Placement.SHARED
        self._tests: list[ItemSpec] = []
        self._seconds: list[float] = []
        self._learned = 0
        #: The worker the end of the collection was kept for when the fan-out was cut.
        self._reserved_for: W | None = None
        self._loaded = False
        self._serial: deque[int] = deque()
        self._fanout: FanoutPool[W] = FanoutPool((), seconds=(), groups=())
        self._workers: dict[W, _Worker] = {}
        self._serial_worker: W | None = None
        self._fanout_open = True
        self._early_serial = False
        self._completed: set[int] = set()
        #: Items a crashed worker held, or requeued: they go to whoever takes work next,
        #: below its watermark maybe, as with ``load``.
        self._returned: set[int] = set()
        self._needs: dict[int, int] = {}
        self._counter = 0
        self._peak_open = 0
        self.overruns: list[Overrun] = []

    # -- inputs -------------------------------------------------------------------------

    def load(self, tests: Sequence[ItemSpec], *, fanout_open: bool = True) -> list[Action]:
        """Take the collection (once): the serial lane in collection order, the fan-out
        in collection order cut into ranges once the workers are in (``Order.COLLECTION``)
        or longest group first (``Order.DURATION``).

        With ``fanout_open=False`` nothing starts until ``open_fanout`` (every worker is
        in), except a serial lane whose first item is long (``EARLY_START_SECONDS``):
        the first worker up starts the run's critical path while the others boot.
        """
        assert not self._loaded, "collection loaded twice"
        self._loaded = True
        self._tests = list(tests)
        self._serial = deque(i for i, t in enumerate(tests) if t.lane is Lane.SERIAL)
        first = self._tests[self._serial[0]].duration if self._serial else None
        self._fanout_open = fanout_open
        self._early_serial = first is not None and first >= EARLY_START_SECONDS
        fanout = [i for i, t in enumerate(tests) if t.lane is Lane.FANOUT]
        if self.order is Order.DURATION:
            fanout = self._longest_groups_first(fanout)
        self._seconds = expected_seconds([t.duration for t in tests])
        self._learned = sum(t.duration is not None for t in tests)
        self._fanout = FanoutPool(
            fanout,
            seconds=self._seconds,
            groups=[t.group for t in tests],
            placement=self.placement,
        )
        return self._plan()

    def _longest_groups_first(self, indices: list[int]) -> list[int]:
        """Whole groups (modules) in order of total duration, unmeasured ones first, each
        in collection order: long work starts early, and module fixtures are set up once
        per worker rather than once per item."""
        groups: dict[str, list[int]] = {}
        for index in indices:
            groups.setdefault(self._tests[index].group, []).append(index)

        def weight(members: list[int]) -> tuple[bool, float]:
            durations = [self._tests[i].duration for i in members]
            return (None not in durations, -sum(d or 0.0 for d in durations))

        return [i for members in sorted(groups.values(), key=weight) for i in members]

    def open_fanout(self) -> list[Action]:
        """Every worker expected at the start is in: share out the fan-out (idempotent)."""
        self._fanout_open = True
        return self._plan()

    def add_worker(self, worker: W) -> list[Action]:
        """A worker is ready (initially, or replacing a crashed one)."""
        assert worker not in self._workers
        self._workers[worker] = _Worker(order=self._next())
        return self._plan() if self._loaded else []

    def remove_worker(self, worker: W, *, crashed: bool = True) -> tuple[int | None, list[Action]]:
        """A worker is gone; returns the item it was running, if it crashed mid-item.

        The head of a crashed worker's queue counts as the running item (as in xdist's
        ``load``); the rest, or all of a worker that ended normally with items still
        queued (it was shut down first), goes back to the front of its lane, in order.
        """
        state = self._workers.pop(worker)
        if self._serial_worker == worker:
            self._serial_worker = None
        running: int | None = None
        if state.queue and crashed:
            running = state.queue.popleft()
            self._completed.add(running)
        if state.queue:
            self._returned.update(state.queue)
            serial = [i for i in state.queue if self._tests[i].lane is Lane.SERIAL]
            self._serial.extendleft(reversed(serial))
            self._fanout.give_back([i for i in state.queue if self._tests[i].lane is Lane.FANOUT])
        self._fanout.release(worker)
        return running, self._plan()

    def set_budget(
        self, budget: int, *, ceiling: int | None = None, give_way: bool = False
    ) -> list[Action]:
        """The room changed mid-run (another run on the server took or gave back a
        share): what already started keeps what it was granted, new goes and grants
        follow the new budget.

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
            return []
        self.budget, self._ceiling, self._give_way = budget, ceiling, give_way
        return self._plan()

    def largest_waiting_need(self) -> int:
        """The most connections an item held back by the budget expects (0: none is),
        so that a run sharing the server's room can ask for more of it."""
        wants = [
            self.need_of(s.queue[s.granted])
            for s in self._workers.values()
            if s.waiting_since and s.granted < len(s.queue)
        ]
        wants += [r.want for s in self._workers.values() for r in s.requests]
        wants += [s.open + s.connecting + 1 for s in self._workers.values() if s.requests]
        return max(wants, default=0)

    def shut_down(self, worker: W) -> None:
        """The worker was told to shut down by someone else (xdist stopping the run)."""
        state = self._workers.get(worker)
        if state is not None:
            state.shut = True

    def requeue(self, index: int) -> list[Action]:
        """Run an item again (xdist ``mark_test_pending``, used by crash handlers)."""
        self._completed.discard(index)
        self._returned.add(index)
        if self._tests[index].lane is Lane.SERIAL:
            self._serial.appendleft(index)
        else:
            self._fanout.give_back([index])
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
        """Live connection counts measured inside a worker; ``released`` when they answer
        a ``Release``. ``version`` orders counts that travel by different routes (the side
        channel, item reports): counts not newer than those already taken are ignored."""
        state = self._workers.get(worker)
        if state is None:
            return []
        stale = version is not None and version <= state.version
        if not stale:
            state.version = state.version if version is None else version
            if open_ > state.open:
                state.connecting = max(0, state.connecting - (open_ - state.open))
            state.open, state.idle = open_, idle
        if released:
            # The answer to a Release counts even when its numbers are not news: the
            # deadlock check waits for it.
            state.release_sent = False
            state.stuck_idle = state.idle
        elif stale:
            return []
        return self._plan()

    def counts_changed(self, worker: W, open_: int, idle: int, version: int | None = None) -> bool:
        """Whether these counts are news (most items end with the counts they began with)."""
        state = self._workers.get(worker)
        if state is None or (version is not None and version <= state.version):
            return False
        return (state.open, state.idle) != (open_, idle)

    def completed(
        self, worker: W, index: int, *, need: int | None = None, duration: float | None = None
    ) -> list[Action]:
        """The worker finished an item; ``need`` is its measured peak, if measured."""
        state = self._workers[worker]
        if state.queue.index(index) < state.granted:
            state.granted -= 1
            expected = self.need_of(index)
            state.granted_needs[expected] -= 1
            if not state.granted_needs[expected]:
                del state.granted_needs[expected]
        state.queue.remove(index)
        if state.requests:
            # A request left unanswered (its wait timed out) is void once its item is over.
            state.requests = _outliving(state, {index})
        if state.floor_item not in state.queue:
            # What was granted belonged to this item (or to none still queued): free it.
            # Grants to a later item that already started stay until that one completes.
            self._free_grants(state)
        state.stuck_idle = 0
        self._completed.add(index)
        if need is not None:
            self._needs[index] = need
            if self.overruns:
                # An overrun is reported with what the item turned out to need in all.
                self.overruns = [
                    replace(o, need=max(o.need, need)) if o.index == index else o
                    for o in self.overruns
                ]
        if duration is not None:
            self._tests[index] = replace(
                self._tests[index], need=self.need_of(index), duration=duration
            )
        if self._settled_after_completion(worker, state):
            return []
        return self._plan()

    def _settled_after_completion(self, worker: W, state: _Worker) -> bool:
        """Whether a completion leaves nothing to decide: the hot path of big suites.

        True only when no worker waits for anything (no requests, no item held back by
        the budget, every queued item already go'ed) and this fan-out worker's queue is
        still long enough that ``_take`` would not refill it. A completion only frees
        room, and nobody wants room, so ``_plan`` would return no action.
        """
        if (
            worker == self._serial_worker
            or not self._fanout
            or not self._fanout_open
            or len(state.queue) < MIN_QUEUE
        ):
            return False
        serial = self._serial_worker
        live = sum(not s.shut for s in self._workers.values())
        # ``_fill_queues`` shares the fan-out among the live workers but the serial one; a
        # stale serial worker only makes ``sharing`` smaller, the target larger: safe side.
        sharing = live - (serial is not None and live > 1)
        if len(state.queue) <= self._fanout_target(worker, sharing) // 2:
            return False  # ``_take_fanout`` would refill it
        if self._serial and (
            serial is None
            or not any(self._tests[i].lane is Lane.SERIAL for i in self._workers[serial].queue)
        ):
            return False  # the serial lane may be (re)assigned
        return all(
            not s.requests and s.granted == len(s.queue) and not s.waiting_since
            for s in self._workers.values()
        )

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
        state = self._workers.get(worker)
        if state is None:
            return []
        if item is None or item not in state.queue:
            item = state.queue[0] if state.queue else None
        else:
            self._forget_ended(state, item)
        if want is None:
            kind = RequestKind.CONNECT
        else:
            kind = RequestKind.RERUN
            state.floor = 0  # the first attempt is over; what it was granted is free
        state.requests.append(
            _Request(worker, request, self._next(), kind, want or 0, item, background)
        )
        return self._plan()

    def _forget_ended(self, state: _Worker, item: int) -> None:
        """``item`` asks: the items queued before it have ended (a worker runs its queue in
        order), even if their completion has not reached us yet. What was granted to them
        is free (their counts, sent before this request, are already taken), and requests
        of theirs left unanswered by a timeout are void."""
        ended = set(itertools.islice(state.queue, state.queue.index(item)))
        if not ended:
            return
        if state.floor_item in ended:
            self._free_grants(state)
        state.requests = _outliving(state, ended)

    @staticmethod
    def _free_grants(state: _Worker) -> None:
        state.floor = 0
        state.connecting = 0
        state.floor_item = None
        state.rerunning = False

    # -- queries ------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def has_pending(self) -> bool:
        """Items not yet completed: pending in a lane or queued on a worker."""
        return bool(self._serial or self._fanout or any(s.queue for s in self._workers.values()))

    def unfinished(self) -> list[int]:
        """Items neither completed nor returned as crashed, in collection order."""
        queued = (i for s in self._workers.values() for i in s.queue)
        return sorted({*self._serial, *self._fanout, *queued})

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

    def describe(self) -> str:
        """One line of per-worker state, for ``--debug`` logs."""
        return " | ".join(
            f"{w}: open={s.open} idle={s.idle} floor={s.floor} need={_granted_need(s)} "
            f"go={s.granted}/{len(s.queue)} req={[r.kind.value for r in s.requests]}"
            f"{' rel' if s.release_sent else ''}{' shut' if s.shut else ''}"
            for w, s in self._workers.items()
        )

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
            learned=self._learned,
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
        if not (self._fanout_open or self._early_serial):
            return
        serial_worker = self._pick_serial_worker()
        # Serial items back in the lane (a crashed one rerun) that their worker, shut down
        # meanwhile, cannot take: keep the others up, one of them takes the lane over.
        orphaned = bool(self._serial) and (
            serial_worker is None or self._workers[serial_worker].shut
        )
        live = [w for w, s in self._workers.items() if not s.shut]
        fanout_workers = [w for w in live if w != serial_worker] or live
        # A worker alone in the run has no one to leave the earlier fan-out items to: it
        # runs both lanes in collection order.
        alone = self._fanout_open and len(live) == 1 and self.order is Order.COLLECTION
        if self._fanout_open and live and not self._fanout.split_done:
            self._split(serial_worker, live)
        for worker in live:
            state = self._workers[worker]
            serial_lane = worker == serial_worker
            if serial_lane and self._serial:
                batch = (
                    self._take_in_order(worker, state)
                    if alone
                    else self._batch(state, self._target(len(self._serial), 1), self._pop_serial)
                )
            else:
                batch = []
            self._hand_out(state, batch)
            if not (serial_lane and self._serial):
                # The fan-out; the serial worker joins it once the serial lane is handed
                # out, in the same pass, so that it never holds a single item. Before
                # every worker is in, it takes only what lets its last serial item start.
                if self._fanout_open:
                    sharing = len(live) if serial_lane else len(fanout_workers)
                    reserved = serial_lane or worker == self._reserved_for
                    more = self._take_fanout(worker, state, sharing, reserved)
                elif serial_lane:
                    more = []
                    while len(state.queue) + len(more) < MIN_QUEUE:
                        index = self._pop_fanout(worker, state)
                        if index is None:
                            break
                        more.append(index)
                else:
                    more = []
                self._hand_out(state, more)
                batch += more
            if batch:
                actions.append(Send(worker, tuple(batch)))
            if (
                not (serial_lane and self._serial)
                and not orphaned
                and not self._fanout.has_for(worker, state.watermark)
            ):
                # Nothing left for it: shut down now, even right after a batch, since
                # xdist starts an item only once it holds the next one or a shutdown.
                state.shut = True
                actions.append(Shutdown(worker))

    def _hand_out(self, state: _Worker, indices: list[int]) -> None:
        """Queue items on a worker and raise its watermark past them."""
        if not indices:
            return
        state.queue.extend(indices)
        returned = self._returned
        state.watermark = max(
            state.watermark, max((i for i in indices if i not in returned), default=-1)
        )

    def _split(self, serial_worker: W | None, live: list[W]) -> None:
        """Cut the fan-out into one range per fan-out worker that has run nothing yet.

        The serial lane's worker, or one that ran tests while the others booted (it
        started the serial lane early), gets the collection's end after what it has run,
        sized so that it ends about when the others do (what it still holds, and the
        serial lane, count against its share): a range below its watermark would be
        stranded there.
        """
        order = sorted(live, key=lambda w: self._workers[w].order)
        owners = [w for w in order if w != serial_worker and self._workers[w].watermark < 0]
        if not owners:
            owners = [w for w in order if self._workers[w].watermark < 0]
        ahead = [w for w in order if w not in owners]
        reserve, after = 0.0, -1
        if ahead and owners:
            state = self._workers[ahead[0]]
            lane = list(self._serial) if ahead[0] == serial_worker else []
            held = sum(self._seconds[i] for i in [*lane, *state.queue])
            share = (held + sum(self._seconds[i] for i in self._fanout)) / (len(owners) + 1)
            reserve = max(0.0, share - held)
            after = max([state.watermark, *lane])
            self._reserved_for = ahead[0]
        self._fanout.split(owners, reserve=reserve, reserve_after=after)

    def _pop_fanout(
        self, worker: W, state: _Worker, *, before: int | None = None, reserved: bool = False
    ) -> int | None:
        """The worker's next fan-out item, its watermark raised past it at once (a dry
        worker picks its next range above the items it is being handed right now)."""
        index = self._fanout.pop(worker, state.watermark, before=before, reserved=reserved)
        if index is not None and index > state.watermark and index not in self._returned:
            state.watermark = index
        return index

    def _pop_serial(self) -> int | None:
        return self._serial.popleft() if self._serial else None

    def _take_in_order(self, worker: W, state: _Worker) -> list[int]:
        """A batch from both lanes merged in collection order (for a worker alone)."""

        def pop() -> int | None:
            head = self._serial[0] if self._serial else None
            index = self._pop_fanout(worker, state, before=head)
            return self._pop_serial() if index is None else index

        pending = len(self._serial) + len(self._fanout)
        return self._batch(state, self._target(pending, 1), pop)

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
        current = self._serial_worker
        if current is not None and not any(
            self._tests[i].lane is Lane.SERIAL for i in self._workers[current].queue
        ):
            # It has not taken a serial item yet (a long queue, or a fresh lane after a
            # crash): the least-loaded worker, a new replacement maybe, starts it sooner.
            self._serial_worker = None
        if self._serial_worker is None:
            head = self._serial[0] if self._serial else -1
            # Preferably one that has run nothing after the lane's next item.
            candidates = [
                (s.watermark > head, len(s.queue), s.order, w)
                for w, s in self._workers.items()
                if not s.shut
            ]
            if candidates:
                self._serial_worker = min(candidates, key=lambda c: c[:3])[3]
        return self._serial_worker

    def _take_fanout(self, worker: W, state: _Worker, sharing: int, reserved: bool) -> list[int]:
        """Fan-out items to add to a worker's queue (``reserved``: it may claim the range
        kept for the serial lane's worker)."""
        return self._batch(
            state,
            self._fanout_target(worker, sharing),
            lambda: self._pop_fanout(worker, state, reserved=reserved),
        )

    def _fanout_target(self, worker: W, sharing: int) -> int:
        """Queue length aimed at: a share of the worker's own range (ranges), or of the
        whole fan-out among the workers sharing it (shared)."""
        if self._fanout.in_order:
            return self._target(self._fanout.own_pending(worker), 1)
        return self._target(len(self._fanout), sharing)

    def _batch(self, state: _Worker, target: int, pop: Callable[[], int | None]) -> list[int]:
        """Load-style batches: big early, small late, and only a few seconds of known
        work ahead of a worker."""
        if len(state.queue) >= MIN_QUEUE and len(state.queue) > target // 2:
            return []
        seconds = sum(self._tests[i].duration or 0.0 for i in state.queue)
        batch: list[int] = []
        while len(state.queue) + len(batch) < target:
            if len(state.queue) + len(batch) >= MIN_QUEUE and seconds >= QUEUE_SECONDS:
                break
            index = pop()
            if index is None:
                break
            batch.append(index)
            seconds += self._tests[index].duration or 0.0
        return batch

    @staticmethod
    def _target(pending: int, sharing: int) -> int:
        return max(MIN_QUEUE, min(MAX_QUEUE, pending // (max(1, sharing) * QUEUE_SPLIT)))

    def _commitment(self, state: _Worker) -> int:
        if any(r.kind is RequestKind.RERUN for r in state.requests):
            return state.open  # it starts nothing before its rerun is granted
        return max(state.open, state.floor, _granted_need(state))

    def _admit(self, actions: list[Action]) -> None:
        """Answer blocked requests first, then give goes; whatever does not fit keeps its
        room reserved, so later, smaller items cannot starve it."""
        committed = {w: self._commitment(s) for w, s in self._workers.items()}
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
        for worker in [] if draining else self._go_order():
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
                    state.granted += 1
                    state.granted_needs[self.need_of(index)] += 1
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

    def _others_busy(self, worker: W) -> bool:
        """Whether any other worker holds connections or runs an item."""
        return any(
            s.open > 0 or (s.granted and not s.requests)
            for w, s in self._workers.items()
            if w != worker
        )

    def _waiting(self) -> list[_Request]:
        """Connect requests first, oldest first: they come from running items, whose
        ending is what frees room; then reruns, which wait for the run to drain."""
        waiting = [r for s in self._workers.values() for r in s.requests]
        return sorted(waiting, key=lambda r: (r.kind is RequestKind.RERUN, r.order))

    def _go_order(self) -> list[W]:
        """Serial lane first (it is the run's critical path), then by arrival."""
        return sorted(
            self._workers,
            key=lambda w: (
                self._workers[w].waiting_since == 0,
                self._workers[w].waiting_since,
                w != self._serial_worker,
                self._workers[w].order,
            ),
        )

    def _answer(self, request: _Request, answer: Answer, actions: list[Action]) -> None:
        worker: W = request.worker  # type: ignore[assignment]
        state = self._workers[worker]
        if answer is not Answer.REFUSED:
            if not self._queued_before(state, state.floor_item, request.item):
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
            self.overruns.append(Overrun(index, need, self.budget, alone))

    def _relieve(self, blocked: list[W], actions: list[Action]) -> None:
        """Free room for blocked workers: ask for idle connections back; when nothing can
        free room any more, break the deadlock (see ``Answer``)."""
        for worker, state in self._workers.items():
            if state.idle > state.stuck_idle and not state.release_sent:
                state.release_sent = True
                actions.append(Release(worker))
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
            or any(self._commitment(s) > 0 for w, s in self._workers.items() if w != victim)
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

    def _can_progress(self, blocked: list[W]) -> bool:
        """Whether some worker will free room without help: it is running an item, or
        it is about to answer a request to release idle connections."""
        stuck = set(blocked)
        for worker, state in self._workers.items():
            if state.release_sent:
                return True
            if worker not in stuck and state.granted and not state.requests:
                return True
        return False

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _queued_before(state: _Worker, later: int | None, earlier: int | None) -> bool:
        """Whether ``earlier`` sits before ``later`` in the worker's queue."""
        if later not in state.queue or earlier not in state.queue:
            return False
        return state.queue.index(earlier) < state.queue.index(later)  # type: ignore[arg-type]

    def _next(self) -> int:
        self._counter += 1
        return self._counter


def _outliving(state: _Worker, ended: set[int]) -> list[_Request]:
    """The requests that outlive the ``ended`` items: those of other items, and a pool's
    background connects (still waiting in the pool's thread: they pass to the worker's
    next item)."""
    kept = []
    for request in state.requests:
        if request.item in ended:
            if not request.background:
                continue
            request.item = next((i for i in state.queue if i not in ended), None)
        kept.append(request)
    return kept


def _granted_need(state: _Worker) -> int:
    """The largest expected need among a worker's go'ed items."""
    return max(state.granted_needs, default=0)


def lane_for(*, serial: bool, parallel: bool, measured: bool, unmarked_serial: bool) -> Lane:
    """The lane of one item: ``serial_only`` items, and with the ``serial`` policy the
    unmarked items not measured yet, run in the serial lane; the rest fan out."""
    if serial or (unmarked_serial and not parallel and not measured):
        return Lane.SERIAL
    return Lane.FANOUT
