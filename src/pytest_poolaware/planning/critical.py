"""The serial lane first: what admission keeps for the run's critical path
(``docs/design.md``, "Admission", rule 4).

Pure logic with no xdist or database imports. While the serial lane has work, its next
test must not wait for anything off the critical path: the room its tests will need is
kept from fan-out goes from the moment its current test runs; a fan-out test that cannot
run beside the lane reserves nothing while it runs and is given the lane's next gap,
room for it kept from the moment it is chosen; and a worker that cannot start its test
yet reserves nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from pytest_poolaware.planning.holders import Holder

#: Room is kept for a serial test only when its need is known (measured in this run or
#: learned): a guess (``poolaware_unknown_need``) would hold fan-out tests back for
#: connections the test may never open, and a cold lane's tests connect through the gate
#: anyway.
KEEP_FOR_UNKNOWN_NEED: Final = False
#: A fan-out test that conflicts with the lane (it fits beside neither the lane's current
#: test nor its next one) waits for a gap of the lane without reserving room: a
#: reservation made while the lane runs would hold its next test back (the demo's
#: 12-connection test kept an 8-connection serial test waiting 1.7 s under a budget of
#: 15). Set False to let it reserve like any other head.
CONFLICTS_WAIT_FOR_A_GAP: Final = True
#: The gap is the next end of one of the lane's tests (or before its first): the
#: conflicting test that has waited longest is given it, room for it is kept from the
#: moment it is chosen, and the lane's next test waits for it. Waiting for the lane's
#: end instead would park its worker (and the tests queued behind it) for the whole
#: lane, and the lane pays the test's duration either way. Set False to run conflicting
#: tests once the lane is done.
GAPS_BETWEEN_LANE_TESTS: Final = True
#: How far ahead the lane is looked at for the room a fan-out test must leave it: at most
#: this many of its tests (each pass looks, so a long lane of quick tests must not cost
#: a scan of the whole lane)...
LANE_HORIZON_ITEMS: Final = 64
#: ... and at most this many seconds of its expected work (a fan-out test expected to
#: take longer leaves room for the lane's tests within the horizon only).
LANE_HORIZON_SECONDS: Final = 60.0

W = TypeVar("W", bound=Hashable)


@dataclass(frozen=True)
class LaneItem:
    """A serial test still to start, as the lane's room is kept for it."""

    index: int
    #: Its need, when known (None: not measured yet).
    need: int | None
    #: Its expected seconds (learned, else the mean of the known ones).
    seconds: float


@dataclass(frozen=True)
class LaneAhead(Generic[W]):
    """The serial lane as the planner sees it before a pass: its worker, its tests still
    to start in run order (those queued on its worker, then those not handed out yet,
    up to the horizon), and the expected seconds of any test (``seconds_of``)."""

    worker: W
    items: tuple[LaneItem, ...]
    seconds_of: Callable[[int], float]


class CriticalPath(Generic[W]):
    """What one admission pass keeps for the serial lane."""

    def __init__(
        self,
        lane: LaneAhead[W],
        holders: Mapping[W, Holder],
        need_of: Callable[[int], int],
        budget: int,
        can_start: Callable[[W], bool],
    ) -> None:
        self.worker = lane.worker
        self._lane = lane
        self._holder = holders[lane.worker]
        self.need_of = need_of
        #: The lane is between tests (or before its first): a gap, if one is wanted.
        self.between = not self._holder.granted
        #: The worker whose head takes the lane's next gap, if any, and that head's need.
        found = gap_for(self, holders, budget, can_start) if GAPS_BETWEEN_LANE_TESTS else None
        #: Idle connections the lane's worker, between tests, can give back at once.
        self.spare = max(0, self._holder.idle - self._holder.stuck_idle)
        self.gap: W | None = None if found is None else found[0]
        self.gap_need = 0 if found is None else found[1]

    def _went(self) -> set[int]:
        """The lane's worker's go'ed items, as of now: the pass gives it its goes first."""
        holder = self._holder
        return set(itertools.islice(holder.queue, holder.granted))

    def _ahead(self) -> list[LaneItem]:
        went = self._went()
        return [item for item in self._lane.items if item.index not in went]

    @property
    def running(self) -> int:
        """The largest expected need among the lane's go'ed items (0: none)."""
        went = self._went()
        return max((self.need_of(i.index) for i in self._lane.items if i.index in went), default=0)

    @property
    def next(self) -> int:
        """The need of the lane's first test without a go, when known (0: none, or
        unknown)."""
        ahead = self._ahead()
        return self._known(ahead[0]) if ahead else 0

    def _known(self, item: LaneItem) -> int:
        if item.need is not None:
            return item.need
        return self.need_of(item.index) if KEEP_FOR_UNKNOWN_NEED else 0

    def keep(self, queue: Iterable[int], index: int, committed: int) -> int:
        """Room a go to ``index``, on a worker with this ``queue`` (``index`` in it), must
        leave free: the most any lane test needs that will start before the worker is
        expected to be done with ``index`` (its commitment holds until then), beyond the
        lane's worker's commitment (``committed``). Kept only while the lane's worker
        has a go'ed test: between tests, it goes first, and a next test that does not
        fit reserves its room itself."""
        if not self._holder.granted:
            return 0
        lasts = 0.0
        for queued in queue:
            lasts += self._lane.seconds_of(queued)
            if queued == index:
                break
        offset, most = 0.0, 0
        for item in self._ahead():
            if offset >= lasts:
                break  # it starts after the worker is expected to be done
            most = max(most, self._known(item))
            offset += item.seconds
        return max(0, most - committed)

    def gap_keep(self, committed: int, gap_worker: int) -> int:
        """Room kept for the gap's test while the lane's current test runs, so that it
        starts when that test ends (``committed``: the lane's worker's commitment;
        ``gap_worker``: its own worker's)."""
        if self.gap is None or not self._holder.granted or self.between:
            return 0
        return max(0, self.gap_need - gap_worker - committed)

    def conflicts(self, need: int, budget: int) -> bool:
        """Whether a test of ``need`` fits beside neither the lane's current test nor its
        next one (a need over the budget counts as the budget: it runs alone)."""
        lane = max(self.running, self.next)
        return CONFLICTS_WAIT_FOR_A_GAP and lane > 0 and min(need, budget) + lane > budget


def gap_for(
    path: CriticalPath[W], holders: Mapping[W, Holder], budget: int, can_start: Callable[[W], bool]
) -> tuple[W, int] | None:
    """The worker whose head takes the lane's next gap: of the heads that conflict with
    the lane and wait, not held by anything else, the one waiting longest."""
    waiting = [
        (state.waiting_since, worker)
        for worker, state in holders.items()
        if worker != path.worker
        and state.waiting_since
        and state.queue
        and not state.granted
        and not state.requests
        and can_start(worker)
        and path.conflicts(path.need_of(state.queue[0]), budget)
    ]
    if not waiting:
        return None
    worker = min(waiting, key=lambda pair: pair[0])[1]
    return worker, path.need_of(holders[worker].queue[0])


def critical_path(
    lane: LaneAhead[W] | None,
    holders: Mapping[W, Holder],
    need_of: Callable[[int], int],
    budget: int,
    can_start: Callable[[W], bool],
) -> CriticalPath[W] | None:
    """The pass's view of the lane, if it has work and its worker is known to admission."""
    if lane is None or lane.worker not in holders:
        return None
    return CriticalPath(lane, holders, need_of, budget, can_start)


@dataclass(frozen=True)
class LaneWaits(Generic[W]):
    """Why one worker's head that does not fit would wait: ``lane`` (None: the worker
    is the lane's, or there is no lane), whether the worker ``can_start`` its head,
    what the lane's worker and the gap's have committed (``lane_worker``, ``gap_worker``),
    whether it is offered the lane's gap (``spare``), and whether goes ahead of time are
    given (``ahead``)."""

    lane: CriticalPath[W] | None
    can_start: bool
    lane_worker: int
    gap_worker: int
    #: It is offered the lane's gap: its head only may start in this pass, and reserves
    #: room only if it fits once the lane's worker gives back its ``spare`` idle
    #: connections (it waits for its go, so it does at once); else the lane goes on.
    spare: int | None = None
    #: Whether items after the one it runs may have their go ahead of time.
    ahead: bool = True

    def keep(self, queue: Iterable[int], index: int) -> int:
        """Room kept for the lane, and for the test that takes its next gap, from a go
        to ``index`` (``CriticalPath.keep``, ``CriticalPath.gap_keep``)."""
        if self.lane is None:
            return 0
        lane = self.lane.keep(queue, index, self.lane_worker)
        return max(lane, self.lane.gap_keep(self.lane_worker, self.gap_worker))

    def for_room(self, need: int, budget: int) -> bool:
        """Whether the head reserves room: not when its worker cannot start it yet, nor
        when it conflicts with the lane (it waits for a gap of the lane: the end of the
        lane's current test finds the lane's next one, not it, first in line)."""
        if not self.can_start:
            return False
        return self.lane is None or not self.lane.conflicts(need, budget)
