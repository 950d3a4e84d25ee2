"""Placement: which worker runs which item, in which order (lanes, queues, shutdowns).

Pure logic with no xdist or database imports. It decides what is handed to each worker
and when a worker gets no more; whether a handed-out item may start is admission's
(``admission``). The fan-out's ranges are ``fanout``'s.

Placement hands out *units*: an item, or all the items of one ``xdist_group`` (in
collection order), which go to one worker in one batch and run there one after the
other. A unit stands at the place of its first item (its *head*): the lanes and the
fan-out's ranges hold heads, watermarks compare heads, so each worker runs its units
in collection order.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from pytest_poolaware.planning.fanout import FanoutPool, Placement, expected_seconds

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
    #: The item's ``xdist_group`` name ("": none): the items of one name run on one
    #: worker, in collection order, one after the other (a unit, see above).
    xdist_group: str = ""


@dataclass(frozen=True)
class Send:
    """Send these items to the worker (xdist ``runtests``)."""

    worker: Hashable
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Shutdown:
    """No more items will ever go to this worker."""

    worker: Hashable


PlacementAction = Send | Shutdown


@dataclass
class _Seat:
    """One worker as placement sees it: what it holds and how far it has got."""

    order: int
    #: Items sent to it and not completed yet, in run order.
    queue: deque[int] = field(default_factory=deque)
    shut: bool = False
    #: Highest collection index handed to it (returned items aside): it is handed only
    #: items above this, so it runs its tests in collection order.
    watermark: int = -1

    def hand_out(self, indices: list[int], returned: set[int], heads: Sequence[int]) -> None:
        """Queue items and raise the watermark past their units' heads (``returned``
        items aside)."""
        if not indices:
            return
        self.queue.extend(indices)
        self.watermark = max(
            self.watermark, max((heads[i] for i in indices if i not in returned), default=-1)
        )

    def next_batch(
        self, tests: Sequence[ItemSpec], target: int, pop: Callable[[], Sequence[int] | None]
    ) -> list[int]:
        """Load-style batches of whole units: big early, small late, and only a few
        seconds of known work ahead of a worker."""
        if len(self.queue) >= MIN_QUEUE and len(self.queue) > target // 2:
            return []
        seconds = sum(tests[i].duration or 0.0 for i in self.queue)
        batch: list[int] = []
        while len(self.queue) + len(batch) < target:
            if len(self.queue) + len(batch) >= MIN_QUEUE and seconds >= QUEUE_SECONDS:
                break
            unit = pop()
            if unit is None:
                break
            batch.extend(unit)
            seconds += sum(tests[i].duration or 0.0 for i in unit)
        return batch


class Placer(Generic[W]):
    """Hands the collection out to workers: the serial lane to one worker at a time, the
    fan-out in ranges (``Order.COLLECTION``) or longest group first (``Order.DURATION``),
    in load-style batches; shuts a worker down once nothing is left for it."""

    def __init__(self, *, order: Order = Order.COLLECTION) -> None:
        self.order = order
        self.placement = Placement.RANGES if order is Order.COLLECTION else Placement.SHARED
        self.tests: list[ItemSpec] = []
        self._seconds: list[float] = []
        #: The head of each item's unit (itself, unless it is in an ``xdist_group``).
        self._heads: list[int] = []
        #: The items of each unit of more than one item not handed out yet, by head.
        self._units: dict[int, tuple[int, ...]] = {}
        self.learned = 0
        #: The worker the end of the collection was kept for when the fan-out was cut.
        self._reserved_for: W | None = None
        self._loaded = False
        self._serial: deque[int] = deque()
        self._fanout: FanoutPool[W] = FanoutPool((), seconds=(), groups=())
        self._workers: dict[W, _Seat] = {}
        self._serial_worker: W | None = None
        self._fanout_open = True
        self._early_serial = False
        self.completed: set[int] = set()
        #: Items a crashed worker held, or requeued: they go to whoever takes work next,
        #: below its watermark maybe, as with ``load``.
        self._returned: set[int] = set()
        #: Items handed out below a watermark because no worker could take them in order
        #: (see ``_hand_back_stranded``): the order guarantee's last exemption.
        self.out_of_order: set[int] = set()
        self._counter = 0

    # -- inputs -------------------------------------------------------------------------

    def load(self, tests: Sequence[ItemSpec], *, fanout_open: bool = True) -> None:
        """Take the collection (once); see ``core.Planner.load``."""
        assert not self._loaded, "collection loaded twice"
        self._loaded = True
        self.tests = whole_groups_in_one_lane(tests)
        self._heads = list(range(len(tests)))
        for members in xdist_groups(self.tests):
            self._units[members[0]] = members
            for index in members:
                self._heads[index] = members[0]
        heads = [i for i in range(len(tests)) if self._heads[i] == i]
        self._serial = deque(i for i in heads if self.tests[i].lane is Lane.SERIAL)
        first = self.tests[self._serial[0]].duration if self._serial else None
        self._fanout_open = fanout_open
        self._early_serial = first is not None and first >= EARLY_START_SECONDS
        fanout = [i for i in heads if self.tests[i].lane is Lane.FANOUT]
        if self.order is Order.DURATION:
            fanout = longest_groups_first(self.tests, fanout, self._members)
        self._seconds = expected_seconds([t.duration for t in tests])
        self.learned = sum(t.duration is not None for t in tests)
        # A unit counts at its head for the whole of its expected seconds.
        unit_seconds = list(self._seconds)
        for head, members in self._units.items():
            unit_seconds[head] = sum(self._seconds[i] for i in members)
        self._fanout = FanoutPool(
            fanout,
            seconds=unit_seconds,
            groups=[t.group for t in self.tests],
            placement=self.placement,
        )

    def open_fanout(self) -> None:
        self._fanout_open = True

    def add_worker(self, worker: W) -> None:
        assert worker not in self._workers
        self._counter += 1
        self._workers[worker] = _Seat(order=self._counter)

    def remove_worker(self, worker: W, *, crashed: bool = True) -> int | None:
        """A worker is gone; returns the item it was running, if it crashed mid-item
        (see ``core.Planner.remove_worker``)."""
        state = self._workers.pop(worker)
        if self._serial_worker == worker:
            self._serial_worker = None
        running: int | None = None
        if state.queue and crashed:
            running = state.queue.popleft()
            self.completed.add(running)
        if state.queue:
            self._returned.update(state.queue)
            serial = [i for i in state.queue if self.tests[i].lane is Lane.SERIAL]
            self._serial.extendleft(reversed(self._units_of(serial)))
            fanout = [i for i in state.queue if self.tests[i].lane is Lane.FANOUT]
            self._fanout.give_back(self._units_of(fanout))
        self._fanout.release(worker)
        return running

    def _units_of(self, indices: Sequence[int]) -> list[int]:
        """Items going back (a crashed worker's): the rest of each group as one unit, so
        it goes whole to the next worker; the heads, in order."""
        units: dict[str, list[int]] = {}
        heads: list[int] = []
        for index in indices:
            name = self.tests[index].xdist_group
            if name and name in units:
                units[name].append(index)
                continue
            heads.append(index)
            if name:
                units[name] = [index]
        for members in units.values():
            self._units[members[0]] = tuple(members)
        return heads

    def _members(self, head: int) -> tuple[int, ...]:
        """The items of the unit at ``head`` (not handed out yet)."""
        return self._units.get(head, (head,))

    def _take_unit(self, head: int) -> tuple[int, ...]:
        """The items of the unit at ``head``, as it is handed out."""
        return self._units.pop(head, (head,))

    def shut_down(self, worker: W) -> None:
        """The worker was told to shut down by someone else (xdist stopping the run)."""
        state = self._workers.get(worker)
        if state is not None:
            state.shut = True

    def requeue(self, index: int) -> None:
        """Run an item again (xdist ``mark_test_pending``, used by crash handlers)."""
        self.completed.discard(index)
        self._returned.add(index)
        if self.tests[index].lane is Lane.SERIAL:
            self._serial.appendleft(index)
        else:
            self._fanout.give_back([index])

    def complete(self, worker: W, index: int) -> None:
        """The worker finished an item."""
        self._workers[worker].queue.remove(index)
        self.completed.add(index)

    def learn(self, index: int, *, need: int, duration: float) -> None:
        """What an item measured in this run, for the batches that follow."""
        self.tests[index] = replace(self.tests[index], need=need, duration=duration)

    def settled_after_completion(self, worker: W) -> bool:
        """Whether a completion leaves placement nothing to do: the hot path of big suites.

        True only when this fan-out worker's queue is still long enough that
        ``_take_fanout`` would not refill it and the serial lane needs no new worker.
        """
        state = self._workers[worker]
        if (
            worker == self._serial_worker
            or not self._fanout
            or not self._fanout_open
            or len(state.queue) < MIN_QUEUE
        ):
            return False
        serial = self._serial_worker
        live = sum(not s.shut for s in self._workers.values())
        # ``fill`` shares the fan-out among the live workers but the serial one; a stale
        # serial worker only makes ``sharing`` smaller, the target larger: safe side.
        sharing = live - (serial is not None and live > 1)
        if len(state.queue) <= self._fanout_target(worker, sharing) // 2:
            return False  # ``_take_fanout`` would refill it
        return not (
            self._serial
            and (
                serial is None
                or not any(self.tests[i].lane is Lane.SERIAL for i in self._workers[serial].queue)
            )
        )  # else the serial lane may be (re)assigned

    # -- queries ------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def serial_worker(self) -> W | None:
        """The worker running the serial lane (the run's critical path), if any."""
        return self._serial_worker

    @property
    def has_pending(self) -> bool:
        """Items not yet completed: pending in a lane or queued on a worker."""
        return bool(self._serial or self._fanout or any(s.queue for s in self._workers.values()))

    @property
    def pending_serial(self) -> int:
        return len(self._serial) + self._grouped_beyond_heads(Lane.SERIAL)

    @property
    def pending_fanout(self) -> int:
        return len(self._fanout) + self._grouped_beyond_heads(Lane.FANOUT)

    def _grouped_beyond_heads(self, lane: Lane) -> int:
        """Items of the lane's pending units besides their heads (cheap: the run's share
        asks after every decision)."""
        return sum(len(m) - 1 for head, m in self._units.items() if self.tests[head].lane is lane)

    @property
    def in_flight(self) -> int:
        return sum(len(s.queue) for s in self._workers.values())

    def unfinished(self) -> list[int]:
        """Items neither completed nor returned as crashed, in collection order."""
        queued = (i for s in self._workers.values() for i in s.queue)
        pending = (i for head in (*self._serial, *self._fanout) for i in self._members(head))
        return sorted({*pending, *queued})

    @property
    def workers(self) -> list[W]:
        """The workers in the run, in the order they joined."""
        return list(self._workers)

    def is_shut(self, worker: W) -> bool:
        return self._workers[worker].shut

    # -- decisions ----------------------------------------------------------------------

    def fill(self, actions: list[PlacementAction]) -> None:
        """Top up the workers' queues; shut down those with nothing left."""
        if not self._loaded or not (self._fanout_open or self._early_serial):
            return
        serial_worker = self._serial_worker = _serial_lane_worker(
            self.tests, self._serial, self._serial_worker, self._workers
        )
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
                    else state.next_batch(
                        self.tests, queue_target(len(self._serial), 1), self._pop_serial
                    )
                )
            else:
                batch = []
            state.hand_out(batch, self._returned, self._heads)
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
                        unit = self._pop_fanout(worker, state)
                        if unit is None:
                            break
                        more.extend(unit)
                else:
                    more = []
                state.hand_out(more, self._returned, self._heads)
                batch += more
                if (
                    self._fanout_open
                    and not self._fanout.has_for(worker, state.watermark)
                    and self._hand_back_stranded()
                ):
                    more = self._take_fanout(worker, state, len(live), reserved=True)
                    state.hand_out(more, self._returned, self._heads)
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

    def _hand_back_stranded(self) -> bool:
        """Fan-out items that no live worker can take in collection order (every one has
        run past them) go back as a crashed worker's do, to be run out of order rather
        than never (xdist would end the run with them pending). Whether any did."""
        lowest = min((s.watermark for s in self._workers.values() if not s.shut), default=None)
        if lowest is None or not self._fanout.in_order:
            return False
        stranded = self._fanout.hand_back_through(lowest)
        items = [i for head in stranded for i in self._members(head)]
        self._returned.update(items)
        self.out_of_order.update(items)
        return bool(stranded)

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
            members = [i for head in lane for i in self._members(head)]
            held = sum(self._seconds[i] for i in [*members, *state.queue])
            fanout = sum(self._seconds[i] for head in self._fanout for i in self._members(head))
            share = (held + fanout) / (len(owners) + 1)
            reserve = max(0.0, share - held)
            after = max([state.watermark, *lane])
            self._reserved_for = ahead[0]
        self._fanout.split(owners, reserve=reserve, reserve_after=after)

    def _pop_fanout(
        self,
        worker: W,
        state: _Seat,
        *,
        before: int | None = None,
        reserved: bool = False,
        alone: bool = False,
    ) -> tuple[int, ...] | None:
        """The worker's next fan-out unit, its watermark raised past it at once (a dry
        worker picks its next range above the items it is being handed right now)."""
        index = self._fanout.pop(
            worker, state.watermark, before=before, reserved=reserved, alone=alone
        )
        if index is None:
            return None
        if index > state.watermark and index not in self._returned:
            state.watermark = index
        return self._take_unit(index)

    def _pop_serial(self) -> tuple[int, ...] | None:
        return self._take_unit(self._serial.popleft()) if self._serial else None

    def _take_in_order(self, worker: W, state: _Seat) -> list[int]:
        """A batch from both lanes merged in collection order (for a worker alone)."""

        def pop() -> tuple[int, ...] | None:
            head = self._serial[0] if self._serial else None
            unit = self._pop_fanout(worker, state, before=head, alone=True)
            return self._pop_serial() if unit is None else unit

        pending = len(self._serial) + len(self._fanout)
        return state.next_batch(self.tests, queue_target(pending, 1), pop)

    def _take_fanout(self, worker: W, state: _Seat, sharing: int, reserved: bool) -> list[int]:
        """Fan-out items to add to a worker's queue (``reserved``: it may claim the range
        kept for the serial lane's worker)."""
        return state.next_batch(
            self.tests,
            self._fanout_target(worker, sharing),
            lambda: self._pop_fanout(worker, state, reserved=reserved),
        )

    def _fanout_target(self, worker: W, sharing: int) -> int:
        """Queue length aimed at: a share of the worker's own range (ranges), or of the
        whole fan-out among the workers sharing it (shared)."""
        if self._fanout.in_order:
            return queue_target(self._fanout.own_pending(worker), 1)
        return queue_target(len(self._fanout), sharing)


def _serial_lane_worker(
    tests: Sequence[ItemSpec], serial: Sequence[int], current: W | None, seats: Mapping[W, _Seat]
) -> W | None:
    """The worker to run the serial lane (``serial``: its items not handed out yet): it
    keeps its worker; a new one is picked when it is gone."""
    serial_left = serial or (
        current is not None and any(tests[i].lane is Lane.SERIAL for i in seats[current].queue)
    )
    if not serial_left:
        return None
    if current is not None and not any(tests[i].lane is Lane.SERIAL for i in seats[current].queue):
        # It has not taken a serial item yet (a long queue, or a fresh lane after a
        # crash): the least-loaded worker, a new replacement maybe, starts it sooner.
        current = None
    if current is None:
        head = serial[0] if serial else -1
        # Preferably one that has run nothing after the lane's next item.
        candidates = [
            (s.watermark > head, len(s.queue), s.order, w) for w, s in seats.items() if not s.shut
        ]
        if candidates:
            current = min(candidates, key=lambda c: c[:3])[3]
    return current


def queue_target(pending: int, sharing: int) -> int:
    """Queue length aimed at for ``pending`` items shared by ``sharing`` workers."""
    return max(MIN_QUEUE, min(MAX_QUEUE, pending // (max(1, sharing) * QUEUE_SPLIT)))


def longest_groups_first(
    tests: Sequence[ItemSpec],
    heads: list[int],
    members: Callable[[int], Sequence[int]] = lambda head: (head,),
) -> list[int]:
    """Whole groups (modules: units by their head's module) in order of total duration,
    unmeasured ones first, each in collection order: long work starts early, and module
    fixtures are set up once per worker rather than once per item."""
    groups: dict[str, list[int]] = {}
    for head in heads:
        groups.setdefault(tests[head].group, []).append(head)

    def weight(module: list[int]) -> tuple[bool, float]:
        durations = [tests[i].duration for head in module for i in members(head)]
        return (None not in durations, -sum(d or 0.0 for d in durations))

    return [head for module in sorted(groups.values(), key=weight) for head in module]


def xdist_groups(tests: Sequence[ItemSpec]) -> list[tuple[int, ...]]:
    """The items of each ``xdist_group`` of more than one item, in collection order."""
    groups: dict[str, list[int]] = {}
    for index, test in enumerate(tests):
        if test.xdist_group:
            groups.setdefault(test.xdist_group, []).append(index)
    return [tuple(members) for members in groups.values() if len(members) > 1]


def whole_groups_in_one_lane(tests: Sequence[ItemSpec]) -> list[ItemSpec]:
    """An ``xdist_group`` with an item in the serial lane runs in the serial lane whole:
    on the serial lane's worker, one test at a time, so the serial lane's items still
    never overlap one another (see ``docs/design.md``, "Groups")."""
    serial = {t.xdist_group for t in tests if t.xdist_group and t.lane is Lane.SERIAL}
    return [replace(t, lane=Lane.SERIAL) if t.xdist_group in serial else t for t in tests]


def lane_for(*, serial: bool, parallel: bool, measured: bool, unmarked_serial: bool) -> Lane:
    """The lane of one item: ``serial_only`` items, and with the ``serial`` policy the
    unmarked items not measured yet, run in the serial lane; the rest fan out."""
    if serial or (unmarked_serial and not parallel and not measured):
        return Lane.SERIAL
    return Lane.FANOUT
