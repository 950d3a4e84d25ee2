"""Placement: which worker runs which item, in which order (lanes, queues, shutdowns).

Pure logic with no xdist or database imports. It decides what is handed to each worker
and when a worker gets no more; whether a handed-out item may start is admission's
(``admission``). What is not handed out yet, as units, is ``lanes``'s; the fan-out's
ranges are ``fanout``'s.

Each worker has a *watermark*: the head of the last unit handed to it. It is handed only
units above it, so it runs its units in collection order.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pytest_poolaware.planning.critical import LANE_HORIZON_ITEMS, LANE_HORIZON_SECONDS
from pytest_poolaware.planning.fanout import Placement
from pytest_poolaware.planning.lanes import ItemSpec, Lane, Lanes

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
class _Seat(Generic[W]):
    """One worker as placement sees it: what it holds, how far it has got, and how it
    takes work from the lanes."""

    worker: W
    order: int
    #: Items sent to it and not completed yet, in run order.
    queue: deque[int] = field(default_factory=deque)
    shut: bool = False
    #: Highest collection index handed to it (returned items aside): it is handed only
    #: items above this, so it runs its tests in collection order.
    watermark: int = -1

    def can_enter(self) -> bool:
        """Whether xdist lets it start its next item: it holds the one after, or a
        shutdown."""
        return self.shut or len(self.queue) >= MIN_QUEUE

    def hand_out(self, indices: list[int], lanes: Lanes[W]) -> None:
        """Queue items and raise the watermark past their units' heads (returned items
        aside)."""
        if not indices:
            return
        self.queue.extend(indices)
        heads = (lanes.heads[i] for i in indices if i not in lanes.returned)
        self.watermark = max(self.watermark, max(heads, default=-1))

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

    def pop_fanout(
        self,
        lanes: Lanes[W],
        *,
        before: int | None = None,
        reserved: bool = False,
        alone: bool = False,
    ) -> tuple[int, ...] | None:
        """Its next fan-out unit, its watermark raised past it at once (a dry worker picks
        its next range above the items it is being handed right now)."""
        index = lanes.fanout.pop(
            self.worker, self.watermark, before=before, reserved=reserved, alone=alone
        )
        if index is None:
            return None
        if index > self.watermark and index not in lanes.returned:
            self.watermark = index
        return lanes.take(index)

    def take_in_order(self, lanes: Lanes[W]) -> list[int]:
        """A batch from both lanes merged in collection order (for a worker alone)."""

        def pop() -> tuple[int, ...] | None:
            head = lanes.serial[0] if lanes.serial else None
            unit = self.pop_fanout(lanes, before=head, alone=True)
            return lanes.pop_serial() if unit is None else unit

        pending = len(lanes.serial) + len(lanes.fanout)
        return self.next_batch(lanes.tests, queue_target(pending, 1), pop)

    def take_follower(self, lanes: Lanes[W]) -> list[int]:
        """Fan-out units behind its serial items until it holds ``MIN_QUEUE`` items, so
        that its last serial item can start (before every worker is in)."""
        more: list[int] = []
        while len(self.queue) + len(more) < MIN_QUEUE:
            unit = self.pop_fanout(lanes)
            if unit is None:
                break
            more.extend(unit)
        return more


class Placer(Generic[W]):
    """Hands the collection out to workers: the serial lane to one worker at a time, the
    fan-out in ranges (``Order.COLLECTION``) or longest group first (``Order.DURATION``),
    in load-style batches; shuts a worker down once nothing is left for it."""

    def __init__(self, *, order: Order = Order.COLLECTION) -> None:
        self.order = order
        self.placement = Placement.RANGES if order is Order.COLLECTION else Placement.SHARED
        self._lanes: Lanes[W] = Lanes(placement=self.placement)
        self.learned = 0
        #: The worker the end of the collection was kept for when the fan-out was cut.
        self._reserved_for: W | None = None
        self._loaded = False
        self._workers: dict[W, _Seat[W]] = {}
        self._serial_worker: W | None = None
        self._fanout_open = True
        self._early_serial = False
        self.completed: set[int] = set()
        self._counter = 0

    # -- inputs -------------------------------------------------------------------------

    def load(self, tests: Sequence[ItemSpec], *, fanout_open: bool = True) -> None:
        """Take the collection (once); see ``core.Planner.load``."""
        assert not self._loaded, "collection loaded twice"
        self._loaded = True
        self._lanes = Lanes(tests, placement=self.placement)
        serial = self._lanes.serial
        first = self._lanes.tests[serial[0]].duration if serial else None
        self._fanout_open = fanout_open
        self._early_serial = first is not None and first >= EARLY_START_SECONDS
        self.learned = sum(t.duration is not None for t in tests)

    def open_fanout(self) -> None:
        self._fanout_open = True

    def add_worker(self, worker: W) -> None:
        assert worker not in self._workers
        self._counter += 1
        self._workers[worker] = _Seat(worker, order=self._counter)

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
            self._lanes.give_back(list(state.queue))
        self._lanes.fanout.release(worker)
        return running

    def shut_down(self, worker: W) -> None:
        """The worker was told to shut down by someone else (xdist stopping the run)."""
        state = self._workers.get(worker)
        if state is not None:
            state.shut = True

    def requeue(self, index: int) -> None:
        """Run an item again (xdist ``mark_test_pending``, used by crash handlers)."""
        self.completed.discard(index)
        self._lanes.requeue(index)

    def complete(self, worker: W, index: int) -> None:
        """The worker finished an item."""
        self._workers[worker].queue.remove(index)
        self.completed.add(index)

    def learn(self, index: int, *, need: int, duration: float) -> None:
        """What an item measured in this run, for the batches that follow."""
        self._lanes.learn(index, need=need, duration=duration)

    def settled_after_completion(self, worker: W) -> bool:
        """Whether a completion leaves placement nothing to do: the hot path of big suites.

        True only when this fan-out worker's queue is still long enough that
        ``_take_fanout`` would not refill it and the serial lane needs no new worker.
        """
        state = self._workers[worker]
        fanout = self._lanes.fanout
        if (
            worker == self._serial_worker
            or not fanout
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
            self._lanes.serial and (serial is None or not self._holds_serial(serial))
        )  # else the serial lane may be (re)assigned

    # -- queries ------------------------------------------------------------------------

    @property
    def tests(self) -> list[ItemSpec]:
        """What is known of each collected item (measured in this run, once it is)."""
        return self._lanes.tests

    def seconds_of(self, index: int) -> float:
        """An item's expected seconds (learned, else assumed alike: ``fanout``)."""
        return self._lanes.seconds[index]

    @property
    def out_of_order(self) -> set[int]:
        """Items handed out below a watermark because no worker could take them in order."""
        return self._lanes.out_of_order

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
        return bool(self._lanes) or any(s.queue for s in self._workers.values())

    def pending(self, lane: Lane) -> int:
        """Items of the lane not handed out yet."""
        return self._lanes.pending(lane)

    @property
    def in_flight(self) -> int:
        return sum(len(s.queue) for s in self._workers.values())

    def unfinished(self) -> list[int]:
        """Items neither completed nor returned as crashed, in collection order."""
        queued = (i for s in self._workers.values() for i in s.queue)
        return sorted({*self._lanes.pending_items(), *queued})

    @property
    def workers(self) -> list[W]:
        """The workers in the run, in the order they joined."""
        return list(self._workers)

    def is_shut(self, worker: W) -> bool:
        return self._workers[worker].shut

    def can_enter(self, worker: W) -> bool:
        """Whether the worker would start its next item on its go: xdist enters an item
        only once the worker holds the next one or a shutdown (unknown workers: yes)."""
        return worker not in self._workers or self._workers[worker].can_enter()

    def lane_ahead(self) -> tuple[W, list[int]] | None:
        """The serial lane's worker and its items still to run, in order (``critical``;
        None: the lane has no work)."""
        worker = self._serial_worker
        if worker is None or worker not in self._workers:
            return None
        return worker, lane_ahead(self._lanes, self._workers[worker].queue)

    def _holds_serial(self, worker: W) -> bool:
        """Whether the worker holds a serial item."""
        tests = self._lanes.tests
        return any(tests[i].lane is Lane.SERIAL for i in self._workers[worker].queue)

    # -- decisions ----------------------------------------------------------------------

    def fill(self, actions: list[PlacementAction]) -> None:
        """Top up the workers' queues; shut down those with nothing left."""
        if not self._loaded or not (self._fanout_open or self._early_serial):
            return
        lanes = self._lanes
        serial_worker = self._serial_worker = _serial_lane_worker(
            lanes.tests, lanes.serial, self._serial_worker, self._workers
        )
        # Serial items back in the lane (a crashed one rerun) that their worker, shut down
        # meanwhile, cannot take: keep the others up, one of them takes the lane over.
        orphaned = bool(lanes.serial) and (
            serial_worker is None or self._workers[serial_worker].shut
        )
        live = [w for w, s in self._workers.items() if not s.shut]
        sharing = len([w for w in live if w != serial_worker] or live)
        if self._fanout_open and live and not lanes.fanout.split_done:
            self._split(serial_worker, live)
        for worker in live:
            state = self._workers[worker]
            serial_lane = worker == serial_worker
            batch = self._serial_batch(state, alone=len(live) == 1) if serial_lane else []
            state.hand_out(batch, lanes)
            in_fanout = not (serial_lane and lanes.serial)
            if in_fanout:
                # The fan-out; the serial worker joins it once the serial lane is handed
                # out, in the same pass, so that it never holds a single item.
                batch += self._fanout_batch(state, serial_lane, sharing=sharing, live=len(live))
            if batch:
                actions.append(Send(worker, tuple(batch)))
            if in_fanout and not orphaned and not lanes.fanout.has_for(worker, state.watermark):
                # Nothing left for it: shut down now, even right after a batch, since
                # xdist starts an item only once it holds the next one or a shutdown.
                state.shut = True
                actions.append(Shutdown(worker))

    def _serial_batch(self, state: _Seat[W], *, alone: bool) -> list[int]:
        """The serial lane's next batch for its worker. A worker alone in the run has no
        one to leave the earlier fan-out items to: it runs both lanes in collection order."""
        lanes = self._lanes
        if not lanes.serial:
            return []
        if alone and self._fanout_open and self.order is Order.COLLECTION:
            return state.take_in_order(lanes)
        return state.next_batch(lanes.tests, queue_target(len(lanes.serial), 1), lanes.pop_serial)

    def _fanout_batch(
        self, state: _Seat[W], serial_lane: bool, *, sharing: int, live: int
    ) -> list[int]:
        """Fan-out units for a worker, handed out to it: a share among the ``sharing``
        fan-out workers (among all ``live`` ones, for the serial lane's worker). Before
        every worker is in, the serial lane's worker takes only what lets its last serial
        item start."""
        worker, lanes = state.worker, self._lanes
        if self._fanout_open:
            reserved = serial_lane or worker == self._reserved_for
            batch = self._take_fanout(state, live if serial_lane else sharing, reserved)
        elif serial_lane:
            batch = state.take_follower(lanes)
        else:
            batch = []
        state.hand_out(batch, lanes)
        if (
            self._fanout_open
            and not lanes.fanout.has_for(worker, state.watermark)
            and self._hand_back_stranded()
        ):
            more = self._take_fanout(state, live, reserved=True)
            state.hand_out(more, lanes)
            batch += more
        return batch

    def _hand_back_stranded(self) -> bool:
        """Fan-out items that no live worker can take in collection order go back, to be
        run out of order rather than never (``Lanes.hand_back_stranded``)."""
        live = [s.watermark for s in self._workers.values() if not s.shut]
        return self._lanes.hand_back_stranded(min(live, default=None))

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
        lanes = self._lanes
        if ahead and owners:
            state = self._workers[ahead[0]]
            lane = list(lanes.serial) if ahead[0] == serial_worker else []
            members = [i for head in lane for i in lanes.members(head)]
            held = sum(lanes.seconds[i] for i in [*members, *state.queue])
            share = (held + lanes.seconds_of(lanes.fanout)) / (len(owners) + 1)
            reserve = max(0.0, share - held)
            after = max([state.watermark, *lane])
            self._reserved_for = ahead[0]
        lanes.fanout.split(owners, reserve=reserve, reserve_after=after)

    def _take_fanout(self, state: _Seat[W], sharing: int, reserved: bool) -> list[int]:
        """Fan-out items to add to a worker's queue (``reserved``: it may claim the range
        kept for the serial lane's worker)."""
        return state.next_batch(
            self._lanes.tests,
            self._fanout_target(state.worker, sharing),
            lambda: state.pop_fanout(self._lanes, reserved=reserved),
        )

    def _fanout_target(self, worker: W, sharing: int) -> int:
        """Queue length aimed at: a share of the worker's own range (ranges), or of the
        whole fan-out among the workers sharing it (shared)."""
        fanout = self._lanes.fanout
        if fanout.in_order:
            return queue_target(fanout.own_pending(worker), 1)
        return queue_target(len(fanout), sharing)


def _serial_lane_worker(
    tests: Sequence[ItemSpec],
    serial: Sequence[int],
    current: W | None,
    seats: Mapping[W, _Seat[W]],
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


def lane_ahead(lanes: Lanes[W], queue: Sequence[int]) -> list[int]:
    """The serial items in the lane's worker's ``queue``, then those not handed out yet,
    up to the horizon (``LANE_HORIZON_ITEMS``, ``LANE_HORIZON_SECONDS``)."""
    ahead = [i for i in queue if lanes.tests[i].lane is Lane.SERIAL]
    seconds = sum(lanes.seconds[i] for i in ahead)
    for head in lanes.serial:
        if len(ahead) >= LANE_HORIZON_ITEMS or seconds >= LANE_HORIZON_SECONDS:
            break
        members = lanes.members(head)
        ahead.extend(members)
        seconds += sum(lanes.seconds[i] for i in members)
    return ahead


def queue_target(pending: int, sharing: int) -> int:
    """Queue length aimed at for ``pending`` items shared by ``sharing`` workers."""
    return max(MIN_QUEUE, min(MAX_QUEUE, pending // (max(1, sharing) * QUEUE_SPLIT)))
