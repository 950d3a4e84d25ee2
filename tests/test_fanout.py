"""The fan-out's placement (``fanout.FanoutPool``) on its own: ranges, dry workers, order."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_poolaware.planning.fanout import FanoutPool, Placement, expected_seconds


def pool(
    durations: list[float],
    groups: list[str] | None = None,
    placement: Placement = Placement.RANGES,
) -> FanoutPool[str]:
    return FanoutPool(
        range(len(durations)),
        seconds=expected_seconds(durations),
        groups=groups or [""] * len(durations),
        placement=placement,
    )


def drain(
    fanout: FanoutPool[str], worker: str, watermark: int = -1, count: int | None = None
) -> list[int]:
    """What the worker takes, asking ``count`` times (or until it gets nothing)."""
    taken: list[int] = []
    while count is None or len(taken) < count:
        index = fanout.pop(worker, watermark)
        if index is None:
            break
        taken.append(index)
        watermark = max(watermark, index)
    return taken


def test_ranges_are_contiguous_and_balanced_by_expected_duration() -> None:
    """A long test near the end gets a range of its own, so it starts at once."""
    fanout = pool([1.0] * 12 + [12.0])
    fanout.split(["a", "b"])
    assert fanout.pop("b", -1) == 12
    assert drain(fanout, "a") == list(range(12))


def test_a_cut_moves_to_a_module_boundary_when_the_modules_setup_outweighs_the_move() -> None:
    """m2's first test takes 2.8 s more than its others (its module fixtures): a second
    worker starting mid-m2 would repeat that, which costs more than moving 0.4 s."""
    groups = ["m1"] * 5 + ["m2"] * 3 + ["m3"] * 6
    fanout = pool([1.0] * 5 + [3.0, 0.2, 0.2] + [1.0] * 6, groups)
    fanout.split(["a", "b"])
    assert fanout.pop("b", -1) == 8  # an even cut would split m2 at 6


def test_a_cut_stays_inside_a_module_whose_setup_is_cheaper_than_the_move() -> None:
    """Found on a suite whose first module had 56 light tests: moving the cut to a module
    boundary put 2 s more into the first range, which no dry worker may take from."""
    groups = ["m1"] * 20 + ["m2"] * 20
    fanout = pool([1.0] * 40, groups)
    fanout.split(["a", "b", "c"])
    assert fanout.pop("b", -1) == 13  # 13.3 s each; m1 ends at 20
    assert drain(fanout, "a", count=14) == [*range(13), 20]  # then b's end, from m2


def test_a_dry_worker_takes_the_end_of_a_range_after_its_watermark() -> None:
    fanout = pool([1.0] * 20)
    fanout.split(["a", "b"])
    assert drain(fanout, "b") == list(range(10, 20))
    # b is dry; a's range (0..9) lies before its watermark: nothing it may take
    assert not fanout.has_for("b", 19)
    assert fanout.pop("b", 19) is None
    # a fresh worker (a replacement) takes the end of a's range; a keeps the front
    assert fanout.pop("c", -1) == 5
    assert drain(fanout, "a", count=5) == [0, 1, 2, 3, 4]


def test_the_serial_lanes_worker_claims_the_end_kept_for_it() -> None:
    fanout = pool([1.0] * 20)
    fanout.split(["a"], reserve=6.0, reserve_after=3)
    assert drain(fanout, "a", count=14) == list(range(14))
    # another dry worker takes only the end of the kept range
    assert fanout.pop("a", 13) == 17
    # the serial lane's worker, its lane over at index 3, claims what is left of it
    assert fanout.pop("s", 3, reserved=True) == 14
    assert drain(fanout, "s", 14, count=2) == [15, 16]


def test_a_worker_alone_claims_the_kept_end_from_its_front() -> None:
    """The serial lane's worker left alone takes the end kept for it in order: taking
    only its last part (as another dry worker does) would strand the front below it."""
    fanout = pool([1.0] * 20)
    fanout.split(["a"], reserve=6.0, reserve_after=3)
    assert drain(fanout, "a", count=14) == list(range(14))
    assert fanout.pop("s", 3, before=2, alone=True) is None  # its serial item 2 first
    assert drain(fanout, "s", 3) == list(range(14, 20))


def test_tests_below_every_watermark_are_handed_back() -> None:
    fanout = pool([1.0] * 10)
    fanout.split(["a", "b"])
    assert drain(fanout, "b", count=2) == [5, 6]
    assert fanout.hand_back_through(2) == [0, 1, 2]
    assert len(fanout) == 8  # still to run, first
    assert fanout.pop("b", 6) == 0  # exempt from b's watermark, as returned tests are
    assert len(fanout) == 7


def test_returned_tests_go_first_to_whoever_asks() -> None:
    fanout = pool([1.0] * 6)
    fanout.split(["a", "b"])
    assert fanout.pop("a", -1) == 0
    fanout.give_back([4, 5])
    assert fanout.pop("a", 3) == 4  # below nothing: returned tests are exempt
    assert fanout.pop("b", 5) == 5


def test_shared_placement_hands_out_in_the_given_order_to_anyone() -> None:
    fanout: FanoutPool[str] = FanoutPool(
        [3, 1, 2], seconds=[1.0] * 4, groups=[""] * 4, placement=Placement.SHARED
    )
    fanout.split(["a", "b"])  # no ranges
    assert [fanout.pop("a", 9), fanout.pop("b", 9), fanout.pop("a", 9)] == [3, 1, 2]


@settings(deadline=None, max_examples=200)
@given(
    durations=st.lists(st.floats(0, 10), min_size=1, max_size=40),
    workers=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_test_is_handed_out_once_each_worker_in_collection_order(
    durations: list[float], workers: int, seed: int
) -> None:
    """Workers asking in any order, some leaving (their ranges go to the others), with
    replacements: every test goes out once, each worker's in ascending order."""
    rng = random.Random(seed)
    groups = [rng.choice("xyz") for _ in durations]
    fanout = pool(durations, groups)
    names = [f"w{n}" for n in range(workers)]
    fanout.split(names)
    taken: dict[str, list[int]] = {name: [] for name in names}
    fresh = 0
    while fanout:
        name = rng.choice(names)
        if rng.random() < 0.05:  # the worker goes away; a replacement joins
            fanout.release(name)
            names.remove(name)
            fresh += 1
            name = f"new{fresh}"
            names.append(name)
            taken[name] = []
        watermark = max(taken[name], default=-1)
        index = fanout.pop(name, watermark)
        if index is None:
            assert not fanout.has_for(name, watermark)
            assert any(fanout.has_for(n, max(taken[n], default=-1)) for n in names) or not fanout
            continue
        taken[name].append(index)
    handed = sorted(i for t in taken.values() for i in t)
    assert handed == list(range(len(durations)))
    for indices in taken.values():
        assert indices == sorted(indices)
