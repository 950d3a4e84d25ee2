"""The lanes alone (``lanes.Lanes``): what is not handed out yet, as units, and where an
item runs (``lane_for``). No placement, no xdist."""

from __future__ import annotations

from pytest_poolaware.planning.fanout import Placement
from pytest_poolaware.planning.lanes import ItemSpec as Item
from pytest_poolaware.planning.lanes import Lane, Lanes, lane_for

SERIAL = Lane.SERIAL
FANOUT = Lane.FANOUT


def grouped(lanes: str, names: str) -> list[Item]:
    """Items by letter: lanes ``s``/``f``; ``xdist_group`` names, ``.`` for none."""
    return [
        Item(SERIAL if lane == "s" else FANOUT, 1, xdist_group="" if name == "." else name)
        for lane, name in zip(lanes, names, strict=True)
    ]


def drain_fanout(lanes: Lanes[str], count: int | None = None) -> list[tuple[int, ...]]:
    """The fan-out's units (``count`` of them, or every one), in the order one worker
    would take them."""
    units: list[tuple[int, ...]] = []
    while count is None or len(units) < count:
        head = lanes.fanout.pop("w", -1)
        if head is None:
            break
        units.append(lanes.take(head))
    return units


def test_lane_for_marker_policy() -> None:
    assert lane_for(serial=True, parallel=False, measured=True, unmarked_serial=False) is SERIAL
    assert lane_for(serial=False, parallel=False, measured=False, unmarked_serial=False) is FANOUT
    assert lane_for(serial=False, parallel=False, measured=False, unmarked_serial=True) is SERIAL
    assert lane_for(serial=False, parallel=False, measured=True, unmarked_serial=True) is FANOUT
    assert lane_for(serial=False, parallel=True, measured=False, unmarked_serial=True) is FANOUT


def test_an_xdist_group_is_one_unit_at_its_first_items_place() -> None:
    lanes: Lanes[str] = Lanes(grouped("fffff", "a.a.a"))
    assert lanes.heads == [0, 1, 0, 3, 0]
    assert lanes.pending(FANOUT) == 5  # every item counts, not only the heads
    assert drain_fanout(lanes) == [(0, 2, 4), (1,), (3,)]
    assert not lanes


def test_a_group_with_a_serial_item_is_in_the_serial_lane_whole() -> None:
    lanes: Lanes[str] = Lanes(grouped("ffsf", "a.a."))
    assert [t.lane for t in lanes.tests] == [SERIAL, FANOUT, SERIAL, FANOUT]
    assert (lanes.pending(SERIAL), lanes.pending(FANOUT)) == (2, 2)
    assert lanes.pop_serial() == (0, 2)
    assert lanes.pop_serial() is None


def test_a_gone_workers_items_go_back_first_the_rest_of_a_group_as_one_unit() -> None:
    lanes: Lanes[str] = Lanes(grouped("sfffff", "..bbb."))
    assert lanes.pop_serial() == (0,)
    assert drain_fanout(lanes, 2) == [(1,), (2, 3, 4)]
    lanes.give_back([0, 3, 4])  # it crashed in 2: the rest of b, and its serial item
    assert lanes.returned == {0, 3, 4}
    assert lanes.pop_serial() == (0,)
    assert drain_fanout(lanes) == [(3, 4), (5,)]


def test_a_requeued_item_goes_to_the_front_of_its_lane() -> None:
    lanes: Lanes[str] = Lanes([Item(SERIAL), Item(SERIAL), Item(FANOUT), Item(FANOUT)])
    assert lanes.pop_serial() == (0,)
    assert drain_fanout(lanes, 1) == [(2,)]
    lanes.requeue(0)
    lanes.requeue(2)
    assert lanes.pop_serial() == (0,)
    assert drain_fanout(lanes) == [(2,), (3,)]
    assert lanes.returned == {0, 2}


def test_fanout_items_below_every_watermark_go_back_out_of_order() -> None:
    lanes: Lanes[str] = Lanes(grouped("ffffff", "..aa.."))
    assert not lanes.hand_back_stranded(None)  # no live worker: nothing to hand back to
    assert lanes.hand_back_stranded(2)
    assert lanes.out_of_order == lanes.returned == {0, 1, 2, 3}
    assert not lanes.hand_back_stranded(2)
    shared: Lanes[str] = Lanes(grouped("ffffff", "......"), placement=Placement.SHARED)
    assert not shared.hand_back_stranded(4)  # shared: any worker takes any test
