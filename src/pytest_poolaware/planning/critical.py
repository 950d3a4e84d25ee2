"""The serial lane first: what admission keeps for the run's critical path
(``docs/design.md``, "Admission", rule 4).

Pure logic with no xdist or database imports. While the serial lane has work, its next
test must not wait for anything off the critical path: the room it will need is kept
from fan-out goes from the moment its current test runs, a fan-out test that cannot run
beside the lane waits for a gap of the lane without reserving room meanwhile, and a
worker that cannot start its test yet reserves nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from pytest_poolaware.planning.holders import Holder

#: Room is kept for the lane's next test only when its need is known (measured in this
#: run or learned): a guess (``poolaware_unknown_need``) would hold fan-out tests back
#: for connections the test may never open, and a cold lane's tests connect through the
#: gate anyway.
KEEP_FOR_UNKNOWN_NEED: Final = False
#: A fan-out test that conflicts with the lane (it fits beside none of the lane's
#: current and next tests) waits for a gap of the lane without reserving room: a
#: reservation made while the lane runs would hold its next test back (the demo's
#: 12-connection test kept an 8-connection serial test waiting 1.7 s under a budget of
#: 15). Set False to let it reserve like any other head.
CONFLICTS_WAIT_FOR_A_GAP: Final = True

W = TypeVar("W", bound=Hashable)


@dataclass(frozen=True)
class LaneAhead(Generic[W]):
    """The serial lane as the planner sees it before a pass: its worker, and its items
    still to start in run order, each with its need if known (those queued on its
    worker, then the next one not handed out yet)."""

    worker: W
    items: tuple[tuple[int, int | None], ...]


class CriticalPath(Generic[W]):
    """What one admission pass keeps for the serial lane.

    ``running``: the largest expected need among the lane's go'ed items on its worker
    (0: none go'ed); ``next``: the need of the lane's first item without a go, when
    known (0: none, or unknown).
    """

    def __init__(self, lane: LaneAhead[W], holder: Holder, need_of: Callable[[int], int]) -> None:
        self.worker = lane.worker
        went = set(list(holder.queue)[: holder.granted])
        self.running = max((need_of(i) for i, _ in lane.items if i in went), default=0)
        self.next = 0
        waiting = [(i, need) for i, need in lane.items if i not in went]
        if waiting:
            index, need = waiting[0]
            if need is not None:
                self.next = need
            elif KEEP_FOR_UNKNOWN_NEED:
                self.next = need_of(index)

    def keep(self, committed: int) -> int:
        """Room other workers' goes must leave free: what the lane's next test will need
        beyond its worker's commitment (``committed``) when its current test ends.
        Kept only while the current one runs: between tests, the lane's worker goes
        first, and a next test that does not fit reserves its room itself."""
        if not self.running:
            return 0
        return max(0, self.next - committed)

    def conflicts(self, need: int, budget: int) -> bool:
        """Whether a test of ``need`` fits beside neither the lane's current test nor its
        next one (a need over the budget counts as the budget: it runs alone)."""
        lane = max(self.running, self.next)
        return CONFLICTS_WAIT_FOR_A_GAP and lane > 0 and min(need, budget) + lane > budget


def critical_path(
    lane: LaneAhead[W] | None, holders: Mapping[W, Holder], need_of: Callable[[int], int]
) -> CriticalPath[W] | None:
    """The pass's view of the lane, if it has work and its worker is known to admission."""
    holder = None if lane is None else holders.get(lane.worker)
    if lane is None or holder is None:
        return None
    return CriticalPath(lane, holder, need_of)
