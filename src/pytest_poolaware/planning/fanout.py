"""The fan-out's tests not handed out yet, and which worker may take which.

Pure logic, no xdist imports (``placement.Placer`` owns one). Two placements:

* ``ranges`` (the default, ``poolaware_order = collection``): the fan-out is cut into
  contiguous ranges of the collection, one per worker, balanced by expected duration
  (learned, else assumed alike). Each worker takes its range from the front; one that
  runs dry takes the *end* of a range lying after its watermark (the highest index it
  has taken), so every worker still runs its tests in collection order, as with
  ``--dist load``, while learned durations decide who runs what;
* ``shared`` (``poolaware_order = duration``): one queue, longest module first, taken
  from the front by whoever asks; a worker's tests then run out of collection order.

Tests given back after a crash go first, to whoever asks next, as with ``load``.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import statistics
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

W = TypeVar("W", bound=Hashable)

#: Seconds assumed for a test of unknown duration when no test's duration is known (with
#: some known, their mean): only the ratio between tests matters for cutting ranges.
UNKNOWN_SECONDS: Final = 1.0
#: A worker that runs dry takes this share of the expected work left in a range.
STEAL_SHARE: Final = 0.5
#: Seconds every test is assumed to cost on top of its duration (the run's per-test
#: overhead): tests measured at 0 s still count when ranges are cut.
PER_TEST_SECONDS: Final = 0.001


class Placement(enum.Enum):
    """How the fan-out is shared out (recorded in the run report)."""

    RANGES = "ranges"
    SHARED = "shared"


@dataclass(eq=False)
class _Range:
    """Contiguous tests of the collection not handed out yet, in collection order."""

    items: deque[int]
    seconds: float
    owner: Hashable | None = None
    #: Kept for the serial lane's worker once its lane ends; others take only its end.
    reserved: bool = False


class FanoutPool(Generic[W]):
    """Pending fan-out tests: ``pop`` hands one to a worker, respecting its watermark."""

    def __init__(
        self,
        items: Sequence[int],
        *,
        seconds: Sequence[float],
        groups: Sequence[str],
        placement: Placement = Placement.RANGES,
    ) -> None:
        """``items`` in the order they go out; ``seconds`` and ``groups`` (modules): the
        expected duration and group of every collected test, by collection index."""
        self.seconds = seconds
        self.groups = groups
        self.placement = placement
        self.split_done = False
        self._returned: deque[int] = deque()
        whole = deque(items)
        self._ranges = [_Range(whole, sum(seconds[i] for i in whole))]
        self._owned: dict[W, _Range] = {}
        self._count = len(whole)

    # -- queries --------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[int]:
        return itertools.chain(self._returned, *(r.items for r in self._ranges))

    @property
    def in_order(self) -> bool:
        return self.placement is Placement.RANGES

    def own_pending(self, worker: W) -> int:
        """Tests left in the worker's own range (ranges), or in the whole pool (shared)."""
        if not self.in_order:
            return self._count
        own = self._owned.get(worker)
        return len(own.items) if own is not None else 0

    def has_for(self, worker: W, watermark: int) -> bool:
        """Whether ``pop`` would hand this worker anything (cheap on the hot path)."""
        if not self._count:
            return False
        if self._returned or not self.in_order:
            return True
        own = self._owned.get(worker)
        if own is not None and own.items:
            return True
        return any(r.items and r.items[-1] > watermark for r in self._ranges)

    # -- changes --------------------------------------------------------------------------

    def give_back(self, indices: Sequence[int]) -> None:
        """Tests a crashed worker held (or a requeued one): they go first, in this order."""
        self._returned.extendleft(reversed(indices))
        self._count += len(indices)

    def hand_back_through(self, watermark: int) -> list[int]:
        """Tests up to ``watermark`` (no live worker can take them in order: each has run
        past them) go back as a crashed worker's do: first, to whoever asks next."""
        stranded: list[int] = []
        for source in self._ranges:
            while source.items and source.items[0] <= watermark:
                stranded.append(source.items.popleft())
                source.seconds -= self.seconds[stranded[-1]]
        if stranded:
            stranded.sort()
            self._count -= len(stranded)
            self.give_back(stranded)
        return stranded

    def release(self, worker: W) -> None:
        """The worker is gone: what is left of its range is anyone's (lowest first)."""
        own = self._owned.pop(worker, None)
        if own is not None:
            own.owner = None

    def split(self, owners: Sequence[W], *, reserve: float = 0.0, reserve_after: int = -1) -> None:
        """Cut the pool into one range per owner, balanced by expected seconds (ranges).

        ``reserve``: seconds of the collection's end, after ``reserve_after``, kept for
        the serial lane's worker once its lane ends (its share of the whole run).
        """
        if self.split_done or not self.in_order or not owners:
            return
        self.split_done = True
        items = [i for r in self._ranges for i in r.items]
        items.sort()
        ranges: list[_Range] = []
        if reserve > 0:
            start = len(items)
            taken = 0.0
            lowest = bisect.bisect_right(items, reserve_after)
            while start > lowest and taken < reserve:
                start -= 1
                taken += self.seconds[items[start]]
            total = sum(self.seconds[i] for i in items)
            start = self._settle_end(items, start, lowest, (max(total - reserve, reserve), reserve))
            if start < len(items):
                tail = deque(items[start:])
                ranges.append(self._range(tail, reserved=True))
                items = items[:start]
        parts = cut_evenly(items, len(owners), self.seconds, self.groups)
        for owner, part in zip(owners, parts, strict=True):
            owned = self._range(deque(part), owner=owner)
            ranges.append(owned)
            self._owned[owner] = owned
        self._ranges = sorted(ranges, key=lambda r: r.items[0] if r.items else -1)

    def pop(
        self,
        worker: W,
        watermark: int,
        *,
        before: int | None = None,
        reserved: bool = False,
        alone: bool = False,
    ) -> int | None:
        """The next test for this worker, or None: a returned test, else the front of its
        range; a worker whose range is empty first takes a new one (``_steal``). With
        ranges, only tests above ``watermark`` (and below ``before``, if given) are
        handed out. ``reserved``: the worker may claim the serial lane's worker's range.
        ``alone``: it is the only worker left, so it claims the lowest range above its
        watermark, the reserved one included (a range's end would strand its front).
        """
        if self._returned:
            self._count -= 1
            return self._returned.popleft()
        if not self._count:
            return None
        if not self.in_order:
            return self._pop_front(self._ranges[0])
        if not self.split_done:
            return self._pop_lowest_above(watermark, before)
        own = self._owned.get(worker)
        if own is None or not own.items or own.items[0] <= watermark:
            own = self._steal(worker, watermark, reserved or alone, alone)
            if own is None:
                return None
        if before is not None and own.items[0] > before:
            return None
        return self._pop_front(own)

    # -- helpers --------------------------------------------------------------------------

    def _range(
        self, items: deque[int], *, owner: W | None = None, reserved: bool = False
    ) -> _Range:
        return _Range(items, sum(self.seconds[i] for i in items), owner, reserved)

    def _pop_front(self, source: _Range) -> int:
        index = source.items.popleft()
        source.seconds -= self.seconds[index]
        self._count -= 1
        return index

    def _pop_lowest_above(self, watermark: int, before: int | None) -> int | None:
        """Before the split (one range): the lowest test above the watermark."""
        items = self._ranges[0].items
        position = bisect.bisect_right(items, watermark)
        if position >= len(items) or (before is not None and items[position] > before):
            return None
        index = items[position]
        del items[position]
        self._ranges[0].seconds -= self.seconds[index]
        self._count -= 1
        return index

    def _steal(
        self, worker: W, watermark: int, reserved: bool, alone: bool = False
    ) -> _Range | None:
        """Give a dry worker a new range above its watermark: the serial lane's reserved
        one (``reserved``; the lowest unowned one for a worker ``alone``), else the lowest
        range nobody owns, else the end of the range with the most work left."""
        old = self._owned.pop(worker, None)
        if old is not None:
            old.owner = None
        self._ranges = [r for r in self._ranges if r.items]
        above = [r for r in self._ranges if r.items[-1] > watermark and r.owner != worker]
        if not above:
            return None
        claimable = [r for r in above if r.owner is None and (reserved or not r.reserved)]
        if claimable:
            if reserved and not alone:
                source = max(claimable, key=lambda r: r.reserved)
            else:
                source = claimable[0]
            start = bisect.bisect_right(source.items, watermark)
        else:
            source = max(above, key=lambda r: self._seconds_above(r, watermark))
            start = self._tail_start(source, watermark)
        return self._give(source, start, worker)

    def _seconds_above(self, source: _Range, watermark: int) -> float:
        start = bisect.bisect_right(source.items, watermark)
        if start == 0:
            return source.seconds
        return sum(self.seconds[i] for i in itertools.islice(source.items, start, None))

    def _tail_start(self, source: _Range, watermark: int) -> int:
        """Where the part of an owned range taken by a dry worker starts: about
        ``STEAL_SHARE`` of its expected work, above the watermark, at a module boundary
        where one is near; at least one test."""
        items = list(source.items)
        lowest = bisect.bisect_right(items, watermark)
        wanted = STEAL_SHARE * source.seconds
        start, taken = len(items), 0.0
        while start > lowest and (taken < wanted or start == len(items)):
            start -= 1
            taken += self.seconds[items[start]]
        cut = self._settle_end(items, start, lowest, (1 - STEAL_SHARE, STEAL_SHARE))
        return min(cut, len(items) - 1)

    def _settle_end(
        self, items: list[int], start: int, lowest: int, weights: tuple[float, float]
    ) -> int:
        """``settle_cut`` for where the end part of ``items`` starts (kept for the serial
        lane's worker, or taken by a dry worker): above ``lowest``, the front counted
        from the first item."""
        bounds = (lowest, len(items))
        return settle_cut(self.groups, self.seconds, items, start, bounds, weights, left_from=0)

    def _give(self, source: _Range, start: int, worker: W) -> _Range:
        """Move ``source.items[start:]`` into a new range owned by ``worker``."""
        if start == 0:
            taken = source
            taken.reserved = False
        else:
            tail = deque(itertools.islice(source.items, start, None))
            for _ in range(len(tail)):
                source.items.pop()
            taken = self._range(tail)
            source.seconds -= taken.seconds
            self._ranges.insert(self._ranges.index(source) + 1, taken)
        taken.owner = worker
        self._owned[worker] = taken
        return taken


def cut_evenly(
    items: list[int], parts: int, seconds: Sequence[float], groups: Sequence[str]
) -> list[list[int]]:
    """``parts`` contiguous pieces of ``items`` of about equal expected ``seconds``, each
    cut moved to a module boundary (``groups``) where one is near."""
    total = sum(seconds[i] for i in items)
    cuts = [0]
    running, position = 0.0, 0
    for part in range(1, parts):
        goal = total * part / parts
        # A test goes to the range its middle falls in.
        while position < len(items) and running + seconds[items[position]] / 2 <= goal:
            running += seconds[items[position]]
            position += 1
        cut = settle_cut(
            groups, seconds, items, position, (cuts[-1], len(items)), (1.0, parts - part)
        )
        cuts.append(max(cut, cuts[-1]))
        running = sum(seconds[i] for i in items[: cuts[-1]])
        position = cuts[-1]
    cuts.append(len(items))
    return [items[a:b] for a, b in itertools.pairwise(cuts)]


def settle_cut(
    groups: Sequence[str],
    seconds: Sequence[float],
    items: Sequence[int],
    cut: int,
    bounds: tuple[int, int],
    weights: tuple[float, float],
    left_from: int | None = None,
) -> int:
    """Where a cut at ``cut`` goes: to an end of the module (``groups``) it falls in, or
    nowhere, whichever leaves the two sides the least expected work per weight. A side
    that starts mid-module repeats the module's setup (its module-scoped fixtures), so a
    cut moves to a module boundary when that setup outweighs the seconds moved, and stays
    when it does not: every second moved is a second one side runs longer.

    ``bounds``: the positions the cut must stay strictly between. ``weights``: what each
    side stands for (ranges, or shares of one). The left side runs from ``left_from``
    (default ``bounds[0]``), the right side to ``bounds[1]``.
    """
    low, high = bounds
    if not low < cut < high or groups[items[cut - 1]] != groups[items[cut]]:
        return cut
    module = groups[items[cut]]
    start, end = cut, cut
    while start > low and groups[items[start - 1]] == module:
        start -= 1
    while end < high and groups[items[end]] == module:
        end += 1
    setup = module_setup_seconds([seconds[i] for i in items[start:end]])
    first = low if left_from is None else left_from
    total = sum(seconds[i] for i in items[first:high])

    def cost(position: int, repeated: float) -> float:
        left = sum(seconds[i] for i in items[first:position])
        return max(left / weights[0], (total - left + repeated) / weights[1])

    # On a tie the boundary wins (listed first): one setup fewer for the same wall.
    options = [(cost(p, 0.0), p) for p in (start, end) if low < p < high]
    options.append((cost(cut, setup), cut))
    return min(options, key=lambda option: option[0])[1]


def module_setup_seconds(module: Sequence[float]) -> float:
    """What a module's first test takes beyond its typical test (the median): its
    module-scoped fixtures' setup, by the learned durations."""
    if len(module) < 2:
        return 0.0
    return max(0.0, module[0] - statistics.median(module[1:]))


def expected_seconds(durations: Sequence[float | None]) -> list[float]:
    """Durations with the unknown ones filled in by the mean of the known ones."""
    known = [d for d in durations if d is not None]
    fill = sum(known) / len(known) if known else UNKNOWN_SECONDS
    return [PER_TEST_SECONDS + (fill if d is None else d) for d in durations]
