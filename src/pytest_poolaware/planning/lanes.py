"""The lanes: the collection's items not handed out yet, the serial lane's in collection
order and the fan-out's in a ``fanout.FanoutPool``.

Pure logic with no xdist or database imports. Items go out as *units*: an item, or all
the items of one ``xdist_group`` (in collection order), which go to one worker in one
batch and run there one after the other. A unit stands at the place of its first item
(its *head*): the lanes hold heads, and ``placement`` compares heads with its workers'
watermarks, so each worker runs its units in collection order.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from pytest_poolaware.planning.fanout import FanoutPool, Placement, expected_seconds

W = TypeVar("W", bound=Hashable)


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
    #: The levels of its relatives, nearest first (``priors.family``): a need measured
    #: at one plans those of its tests not measured yet.
    family: tuple[str, ...] = ()


class Lanes(Generic[W]):
    """The items not handed out yet, as units at their heads (see above).

    With ``Placement.SHARED`` the fan-out goes out longest module first; with
    ``Placement.RANGES``, in the ranges ``FanoutPool`` cuts.
    """

    def __init__(
        self, tests: Sequence[ItemSpec] = (), *, placement: Placement = Placement.RANGES
    ) -> None:
        self.tests = whole_groups_in_one_lane(tests)
        #: The head of each item's unit (itself, unless it is in an ``xdist_group``).
        self.heads = list(range(len(tests)))
        #: The items of each unit of more than one item not handed out yet, by head.
        self._units: dict[int, tuple[int, ...]] = {}
        for members in xdist_groups(self.tests):
            self._units[members[0]] = members
            for index in members:
                self.heads[index] = members[0]
        heads = [i for i in range(len(tests)) if self.heads[i] == i]
        self.serial = deque(i for i in heads if self.tests[i].lane is Lane.SERIAL)
        fanout = [i for i in heads if self.tests[i].lane is Lane.FANOUT]
        if placement is Placement.SHARED:
            fanout = longest_groups_first(self.tests, fanout, self.members)
        #: Each item's expected seconds (learned, else assumed alike).
        self.seconds = expected_seconds([t.duration for t in tests])
        # A unit counts at its head for the whole of its expected seconds.
        unit_seconds = list(self.seconds)
        for head, members in self._units.items():
            unit_seconds[head] = sum(self.seconds[i] for i in members)
        self.fanout: FanoutPool[W] = FanoutPool(
            fanout,
            seconds=unit_seconds,
            groups=[t.group for t in self.tests],
            placement=placement,
        )
        #: Items a crashed worker held, or requeued: they go to whoever takes work next,
        #: below its watermark maybe, as with ``load``.
        self.returned: set[int] = set()
        #: Items handed out below a watermark because no worker could take them in order
        #: (see ``hand_back_stranded``): the order guarantee's last exemption.
        self.out_of_order: set[int] = set()

    # -- units ----------------------------------------------------------------------------

    def members(self, head: int) -> tuple[int, ...]:
        """The items of the unit at ``head`` (not handed out yet)."""
        return self._units.get(head, (head,))

    def take(self, head: int) -> tuple[int, ...]:
        """The items of the unit at ``head``, as it is handed out."""
        return self._units.pop(head, (head,))

    def pop_serial(self) -> tuple[int, ...] | None:
        """The serial lane's next unit, if any."""
        return self.take(self.serial.popleft()) if self.serial else None

    def learn(self, index: int, *, need: int, duration: float) -> None:
        """What an item measured in this run, for the batches that follow."""
        self.tests[index] = replace(self.tests[index], need=need, duration=duration)

    # -- items coming back ------------------------------------------------------------------

    def give_back(self, indices: Sequence[int]) -> None:
        """A gone worker's queue goes back to the front of its lanes, in order: the rest of
        each group as one unit, so it goes whole to the next worker."""
        self.returned.update(indices)
        serial = [i for i in indices if self.tests[i].lane is Lane.SERIAL]
        self.serial.extendleft(reversed(self._regroup(serial)))
        fanout = [i for i in indices if self.tests[i].lane is Lane.FANOUT]
        self.fanout.give_back(self._regroup(fanout))

    def _regroup(self, indices: Sequence[int]) -> list[int]:
        """The heads of the units ``indices`` make, in order (each group's items one unit)."""
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

    def requeue(self, index: int) -> None:
        """Run an item again: it goes to the front of its lane."""
        self.returned.add(index)
        if self.tests[index].lane is Lane.SERIAL:
            self.serial.appendleft(index)
        else:
            self.fanout.give_back([index])

    def hand_back_stranded(self, lowest: int | None) -> bool:
        """Fan-out items at or below ``lowest`` (the live workers' lowest watermark: every
        one has run past them) go back as a crashed worker's do, to be run out of order
        rather than never (xdist would end the run with them pending). Whether any did."""
        if lowest is None or not self.fanout.in_order:
            return False
        stranded = self.fanout.hand_back_through(lowest)
        items = [i for head in stranded for i in self.members(head)]
        self.returned.update(items)
        self.out_of_order.update(items)
        return bool(stranded)

    # -- queries ----------------------------------------------------------------------------

    def __bool__(self) -> bool:
        return bool(self.serial or self.fanout)

    def pending(self, lane: Lane) -> int:
        """Items of the lane not handed out yet (cheap: the run's share asks after every
        decision)."""
        units = self.serial if lane is Lane.SERIAL else self.fanout
        beyond_heads = sum(
            len(m) - 1 for head, m in self._units.items() if self.tests[head].lane is lane
        )
        return len(units) + beyond_heads

    def pending_items(self) -> Iterator[int]:
        """Every item not handed out yet, the serial lane's first."""
        return (i for head in (*self.serial, *self.fanout) for i in self.members(head))

    def seconds_of(self, heads: Iterable[int]) -> float:
        """The expected seconds of every item of these units."""
        return sum(self.seconds[i] for head in heads for i in self.members(head))


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
