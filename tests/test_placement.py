"""Placement alone (``placement.Placer``): who runs what, no admission, no xdist.

The planner calls ``fill`` after every input once the collection is in; ``Seats`` does
the same by hand and keeps what each worker was sent. Whether a handed-out item may
start is admission's (``tests/test_admission.py``); both parts together, over random
runs, are ``tests/test_core.py``'s.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import pytest

from pytest_poolaware.planning.lanes import ItemSpec as Item
from pytest_poolaware.planning.lanes import Lane
from pytest_poolaware.planning.placement import (
    EARLY_START_SECONDS,
    MAX_QUEUE,
    MIN_QUEUE,
    QUEUE_SPLIT,
    Order,
    PlacementAction,
    Placer,
    Send,
    Shutdown,
    queue_target,
)

SERIAL = Lane.SERIAL
FANOUT = Lane.FANOUT


def serial(n: int, need: int | None = 1, duration: float | None = None) -> list[Item]:
    return [Item(SERIAL, need, duration) for _ in range(n)]


def fanout(n: int, need: int | None = 1, duration: float | None = None) -> list[Item]:
    return [Item(FANOUT, need, duration) for _ in range(n)]


def grouped(lanes: str, names: str) -> list[Item]:
    """Items by letter: lanes ``s``/``f``; ``xdist_group`` names, ``.`` for none."""
    return [
        Item(SERIAL if lane == "s" else FANOUT, 1, xdist_group="" if name == "." else name)
        for lane, name in zip(lanes, names, strict=True)
    ]


class Seats:
    """Drives a Placer as the planner does (``fill`` after every input) and keeps what
    each worker was sent, for assertions."""

    def __init__(self, *, order: Order = Order.COLLECTION) -> None:
        self.placer: Placer[str] = Placer(order=order)
        self.queues: dict[str, list[int]] = defaultdict(list)
        self.shut: set[str] = set()
        self.opens_on_add = False
        self.added: list[str] = []

    def _fill(self) -> list[PlacementAction]:
        actions: list[PlacementAction] = []
        self.placer.fill(actions)
        for action in actions:
            if isinstance(action, Send):
                self.queues[str(action.worker)].extend(action.indices)
            else:
                self.shut.add(str(action.worker))
        return actions

    @staticmethod
    def sent(actions: Sequence[PlacementAction]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for action in actions:
            if isinstance(action, Send):
                out.setdefault(str(action.worker), []).extend(action.indices)
        return out

    def load(
        self, tests: Sequence[Item], *, fanout_open: bool | None = None
    ) -> list[PlacementAction]:
        """``fanout_open=None``: as the adapter does, the fan-out opens once the workers of
        the next ``add`` (or those already added) are in."""
        if fanout_open is None:
            fanout_open = bool(self.added)
            self.opens_on_add = not fanout_open
        self.placer.load(tests, fanout_open=fanout_open)
        return self._fill()

    def open_fanout(self) -> list[PlacementAction]:
        self.placer.open_fanout()
        return self._fill()

    def add(self, *workers: str) -> list[PlacementAction]:
        self.added.extend(workers)
        actions: list[PlacementAction] = []
        for worker in workers:
            self.placer.add_worker(worker)
            actions += self._fill()
        if self.opens_on_add:
            self.opens_on_add = False
            actions += self.open_fanout()
        return actions

    def complete(self, worker: str, index: int | None = None) -> list[PlacementAction]:
        """Complete the worker's head item (or ``index``)."""
        index = self.queues[worker][0] if index is None else index
        self.queues[worker].remove(index)
        self.placer.complete(worker, index)
        return self._fill()

    def remove(self, worker: str) -> tuple[int | None, list[PlacementAction]]:
        self.queues.pop(worker, None)
        crashed = self.placer.remove_worker(worker)
        return crashed, self._fill()

    @property
    def finished(self) -> bool:
        return self.placer.loaded and not self.placer.has_pending


# -- lanes ----------------------------------------------------------------------------------


def test_serial_worker_gets_no_fanout_while_serial_items_wait() -> None:
    """The serial lane is the run's critical path: its worker does nothing else."""
    t = Seats()
    t.load(serial(8) + fanout(40), fanout_open=False)
    t.add("a", "b")
    t.open_fanout()
    assert t.queues["a"]
    assert all(i < 8 for i in t.queues["a"])
    assert t.queues["b"]
    assert all(i >= 8 for i in t.queues["b"])


def test_serial_worker_joins_the_fanout_once_the_serial_lane_is_empty() -> None:
    """It takes the end of the collection, kept for it: b's range starts after the
    serial lane, a's share is what the lane leaves of an even split (21 - 2 tests)."""
    t = Seats()
    t.load(serial(2) + fanout(40))
    t.add("a", "b")
    assert t.queues["a"] == [0, 1]
    assert t.queues["b"][0] == 2
    t.complete("a")
    assert t.queues["a"][0] == 1
    assert t.queues["a"][1] == 42 - 19
    assert t.queues["a"][1:] == sorted(t.queues["a"][1:])


@pytest.mark.parametrize("first", [None, EARLY_START_SECONDS / 2])
def test_a_quick_or_unknown_serial_lane_waits_for_every_worker(first: float | None) -> None:
    """A quick first item would be reported amid xdist's start-up lines: not worth it."""
    t = Seats()
    t.load(serial(1, duration=first) + serial(3, duration=9.0) + fanout(8), fanout_open=False)
    assert t.add("a", "b") == []
    sent = t.sent(t.open_fanout())
    assert sent["a"] == [0, 1]
    assert sent["b"]
    assert all(i >= 4 for i in sent["b"])


def test_replacement_worker_gets_a_crashed_workers_items() -> None:
    """b was shut down (nothing left to hand out) when a died: only a new worker helps."""
    t = Seats()
    t.load(fanout(4))
    t.add("a", "b")
    held = list(t.queues["a"])
    t.complete("b")
    assert "b" in t.shut
    crashed, actions = t.remove("a")
    assert crashed == held[0]
    assert t.sent(actions) == {}
    t.add("c")
    assert t.queues["c"] == held[1:]


# -- xdist protocol -------------------------------------------------------------------------


def test_worker_is_shut_down_when_its_lane_is_empty() -> None:
    t = Seats()
    t.load(fanout(4))
    t.add("a", "b")
    assert len(t.queues["a"]) == len(t.queues["b"]) == MIN_QUEUE
    t.complete("a")
    assert t.shut == {"a", "b"}  # nothing left to hand out: both run what they hold
    # a late worker with nothing to do is shut down at once, not left waiting
    assert t.add("c") == [Shutdown("c")]


def test_remove_worker_returns_its_head_as_crashed_and_requeues_the_rest_in_order() -> None:
    t = Seats()
    t.load(fanout(64))
    t.add("a", "b")
    held = list(t.queues["a"])
    assert len(held) > 3
    crashed, actions = t.remove("a")
    assert crashed == held[0]
    # the rest of a's queue is back at the front of the fan-out, in the same order
    resent = t.sent(actions).get("b", []) + t.sent(t.add("c")).get("c", [])
    assert len(resent) >= MIN_QUEUE
    assert resent == held[1 : 1 + len(resent)]
    assert t.placer.completed == {held[0]}  # the crashed item counts as ended


def test_remove_worker_of_a_worker_that_finished_reports_no_crash() -> None:
    t = Seats()
    t.load(fanout(2))
    t.add("a")
    t.complete("a")
    t.complete("a")
    assert t.remove("a") == (None, [])
    assert t.finished


# -- ordering -------------------------------------------------------------------------------


def test_long_known_items_are_not_queued_far_ahead() -> None:
    """Known-long items go out a couple at a time, so none waits behind another."""
    t = Seats()
    t.load(fanout(40, duration=10.0))
    t.add("a")
    assert len(t.queues["a"]) == MIN_QUEUE


# -- xdist groups ---------------------------------------------------------------------------


def test_a_group_spread_over_the_collection_goes_whole_to_one_worker_in_order() -> None:
    """Its first and last items lie in different workers' ranges: the worker that takes
    the first takes them all at once, one after the other."""
    t = Seats()
    t.load(grouped("f" * 12, "a..b....b..a"))
    t.add("x", "y")
    t.placer.open_fanout()
    holder = next(w for w, queue in t.queues.items() if 0 in queue)
    queue = t.queues[holder]
    assert queue[queue.index(0) : queue.index(0) + 2] == [0, 11]
    other = next(w for w in t.queues if w != holder)
    assert 11 not in t.queues[other]


def test_the_rest_of_a_crashed_workers_group_goes_whole_to_one_worker() -> None:
    tests = grouped("f" * 16, "aaaaaa" + "." * 10)
    t = Seats()
    t.load(tests)
    t.add("x", "y")
    holder = next(w for w, queue in t.queues.items() if 0 in queue)
    t.complete(holder, 0)
    crashed, actions = t.remove(holder)
    assert crashed == 1
    sent = t.sent(actions) or t.sent(t.add("z"))
    [indices] = [indices for indices in sent.values() if 2 in indices]
    start = indices.index(2)
    assert indices[start : start + 4] == [2, 3, 4, 5]


def test_a_group_counts_once_in_the_pending_totals_per_item() -> None:
    t = Seats()
    t.load(grouped("ssff", "a.aa"))
    assert (t.placer.pending(Lane.SERIAL), t.placer.pending(Lane.FANOUT)) == (4, 0)


# -- queue lengths and the completion fast path ---------------------------------------------


def test_queues_aim_at_a_share_of_what_is_pending_within_bounds() -> None:
    assert queue_target(0, 1) == MIN_QUEUE  # never fewer than xdist needs to start one
    assert queue_target(100, 2) == 100 // (2 * QUEUE_SPLIT)
    assert queue_target(10**6, 1) == MAX_QUEUE


def test_a_completion_needs_no_placement_until_the_queue_is_half_used() -> None:
    """The planner skips ``fill`` after a completion placement calls settled (big suites'
    hot path): that holds exactly until the worker's queue is due a top-up."""
    t = Seats()
    t.load(fanout(400))
    t.add("a", "b")
    skipped = 0
    while t.placer.settled_after_completion("a"):
        t.placer.complete("a", t.queues["a"].pop(0))  # no fill, as the planner skips it
        skipped += 1
    assert skipped > MIN_QUEUE
    actions: list[PlacementAction] = []
    t.placer.fill(actions)
    assert [type(a) for a in actions] == [Send]
    assert Seats.sent(actions).keys() == {"a"}


def test_longest_modules_first_hands_out_unmeasured_then_longest_modules() -> None:
    """``poolaware_order = duration``: modules never measured first, then by their
    total duration, each in collection order."""
    durations = {"m0": 1.0, "m1": 5.0, "m2": None}
    tests = [Item(FANOUT, 1, durations[m], group=m) for m in ("m0", "m0", "m1", "m1", "m2", "m2")]
    t = Seats(order=Order.DURATION)
    t.load(tests)
    t.add("a", "b")
    assert t.queues == {"a": [4, 5], "b": [2, 3]}
