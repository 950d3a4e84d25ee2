"""The arithmetic of runs sharing one server's room (``server.share_plan``): fair shares,
the priority, one run's step towards its share, and the leases of runs just gone. Checked
without a server; the runs themselves share one in test_sharing.py."""

from __future__ import annotations

import pytest

from pytest_poolaware.server.share_plan import (
    DepartedRuns,
    Others,
    SafeBudget,
    fair_shares,
    kept_by_others,
    needs_priority,
    plan,
    served_elsewhere,
    shares_with_priority,
)
from pytest_poolaware.shared.limits import Limits


def test_fair_shares_give_what_is_asked_and_split_the_rest_evenly() -> None:
    assert fair_shares(14, {1: 15}) == {1: 14}
    assert fair_shares(14, {1: 15, 2: 15}) == {1: 7, 2: 7}
    assert fair_shares(14, {1: 3, 2: 15}) == {1: 3, 2: 11}
    assert fair_shares(5, {2: 9, 1: 9}) == {1: 3, 2: 2}  # the same split seen from both
    assert fair_shares(0, {1: 4}) == {1: 0}
    assert fair_shares(6, {1: 0, 2: 2}) == {1: 0, 2: 2}


def test_the_priority_is_served_first_and_leaves_every_other_run_one() -> None:
    assert shares_with_priority(14, {1: 15, 2: 15}, (2, 12)) == {1: 2, 2: 12}
    assert shares_with_priority(14, {1: 1, 2: 15}, (2, 12)) == {1: 1, 2: 13}
    assert shares_with_priority(14, {1: 15, 2: 15, 3: 4}, (2, 14)) == {1: 1, 2: 12, 3: 1}
    assert shares_with_priority(14, {1: 15}, (9, 12)) == {1: 14}  # a run that has gone


NOBODY = Others({}, {})


def test_a_run_alone_takes_the_whole_room() -> None:
    step = plan(
        me=1, allows=16, held=0, demand=15, in_use=0, others=NOBODY, live_others=0, workers=4
    )
    # 16, less its own connection and one slot kept for a run that arrives (its own
    # connection needs one to join).
    assert (step.hold, step.budget, step.share, step.held_back) == (14, 14, 14, False)


def alone_wanting_two(allows: int, workers: int) -> tuple[int, int]:
    """Hold and budget of a run alone whose budget is 2 and whose tests want 2."""
    step = plan(
        me=1, allows=allows, held=0, demand=2, in_use=0, others=NOBODY, live_others=0,
        ceiling=2, workers=workers,
    )  # fmt: skip
    return step.hold, step.budget


def test_a_run_alone_on_a_role_tighter_than_its_workers_has_its_room_unshared() -> None:
    """A role allowing 3 at ``-n 4``: its own connection takes one, its tests get the
    other two (the budget without sharing), not one."""
    assert alone_wanting_two(allows=3, workers=4) == (2, 2)
    # A budget of 2 set on a larger role: the slot costs the tests nothing.
    assert alone_wanting_two(allows=4, workers=4) == (2, 2)
    # One worker: one connection each, with the slot kept.
    assert alone_wanting_two(allows=3, workers=1) == (1, 1)


def test_a_slot_is_kept_for_closes_the_run_cannot_watch() -> None:
    """Another run's, or another client's: they may still count on the server."""
    other = Others({2: 2}, {2: 1})
    step = plan(me=1, allows=16, held=0, demand=15, in_use=0, others=other, live_others=2)
    assert step.share == 16 - 1 - 1 - 1 - 1  # its own, the other's own, closing, its lease
    step = plan(me=1, allows=16, held=0, demand=15, in_use=0, others=NOBODY, live_others=3)
    assert step.hold == 16 - 1 - 3 - 1


def test_a_second_run_waits_for_the_first_to_give_back_what_it_does_not_use() -> None:
    first = Others({1: 15}, {1: 15})  # 14 for its tests, 1 for its own connection
    # The newcomer sees no free slot: it takes none, and waits with one connection.
    step = plan(me=2, allows=16, held=0, demand=15, in_use=0, others=first, live_others=15)
    assert (step.hold, step.share, step.held_back) == (0, 6, True)
    # The first run, above its share, gives back only what it does not use.
    second = Others({2: 1}, {2: 15})
    step = plan(me=1, allows=16, held=14, demand=15, in_use=10, others=second, live_others=1)
    assert (step.hold, step.budget, step.share) == (10, 7, 7)


def test_connections_that_outlive_a_run_are_not_leased_out_twice() -> None:
    """A killed run's workers may hold connections for a moment after its leases died."""
    step = plan(me=1, allows=16, held=4, demand=15, in_use=4, others=NOBODY, live_others=9)
    assert step.hold == 5  # 16 - 1 own - 1 closing - 9 lingering
    assert step.share == 5  # they count as clients that take no part, for now


def test_a_departed_runs_leases_stay_taken_for_a_moment() -> None:
    """Its workers may be opening connections granted just before it went, which the
    server's live count does not show yet."""
    departed = DepartedRuns(grace=1.0)
    assert departed.update({7: 9, 8: 3}, now=10.0) == 0
    assert departed.update({8: 3}, now=10.5) == 8  # 9 slots, one its own connection's
    assert departed.update({8: 3}, now=11.4) == 8
    assert departed.update({}, now=11.49) == 8 + 2
    assert departed.update({}, now=11.5) == 2  # the first one's grace is over
    assert departed.update({}, now=12.6) == 0
    assert departed.update({7: 2}, now=12.7) == 0  # a pid back: a new run, holding its own


def test_a_departed_run_is_not_leased_out_at_once() -> None:
    lingering = Others({}, {}, departed=6)
    step = plan(me=1, allows=16, held=4, demand=15, in_use=4, others=lingering, live_others=2)
    assert step.hold == 8  # 16 - 1 own - 1 closing - 6 the departed run's - 4 held
    step = plan(me=1, allows=16, held=4, demand=15, in_use=4, others=NOBODY, live_others=2)
    assert step.hold == 12  # once the grace is over, only what is live


def test_others_keep_their_own_connection_and_leases_beyond_their_last() -> None:
    assert kept_by_others(NOBODY) == 0
    # Two runs: 6 slots (own + 5 leases: 4 kept beyond the last), 1 slot (own only);
    # a third still waiting for its first slot; 3 leases of a departed run.
    others = Others({2: 6, 3: 1}, {2: 5, 4: 2}, departed=3)
    assert kept_by_others(others) == 5 + 1 + 1 + 3


def test_a_run_with_work_left_keeps_its_last_lease() -> None:
    heavy = Others({2: 14}, {2: 15}, priority=(2, 13))
    step = plan(me=1, allows=16, held=1, demand=3, in_use=0, others=heavy, live_others=14)
    assert (step.hold, step.budget) == (1, 1)


def test_a_run_out_of_touch_keeps_what_it_held_and_falls_to_its_even_part() -> None:
    """Lost touch holding 10 of a room of 16 seen shared by two runs: it keeps 10 while
    its tests use them, falls as they end, never below its even part (6), never up."""
    safe = SafeBudget(held=10, allows=16, runs=2)
    assert safe.floor == 6
    assert safe.follow(10) == 10
    assert safe.follow(8) == 8
    assert safe.follow(9) == 8  # never up
    assert safe.follow(2) == 6
    assert safe.follow(0) == 6


def test_a_run_out_of_touch_never_takes_more_than_it_held() -> None:
    """Holding 2 when it lost touch: 2 it keeps, even though its even part is larger.
    Runs that lost touch together are back within the room once their tests have ended,
    whatever they held (each run's own connection and the closing slot left out)."""
    assert SafeBudget(held=2, allows=16, runs=2).follow(0) == 2
    for held in ((10, 3), (7, 7), (13, 1)):
        safes = [SafeBudget(held=h, allows=16, runs=2) for h in held]
        assert sum(safe.follow(0) for safe in safes) <= 16 - 2 - 1
    three = [SafeBudget(held=h, allows=16, runs=3) for h in (8, 3, 2)]
    assert sum(safe.follow(0) for safe in three) <= 16 - 3 - 1


@pytest.mark.parametrize(
    ("budget", "wants", "reruns", "overdue", "rerun_waits", "needed"),
    [
        (8, 8, (), False, False, False),  # the budget covers it
        (5, 8, (), False, False, True),  # the priority can serve it
        (5, 14, (), False, False, False),  # more than the ceiling: only once overdue
        (5, 14, (), True, False, True),
        (5, 8, (2,), False, False, False),  # another run's rerun waits: it goes first
        (5, 8, (2,), True, False, False),
        (5, 8, (2,), False, True, True),  # both reruns: the first to ask holds it
        (5, 14, (), False, True, True),
    ],
)
def test_a_waiting_rerun_goes_first_for_the_priority(
    budget: int, wants: int, reruns: tuple[int, ...], overdue: bool, rerun_waits: bool, needed: bool
) -> None:
    others = Others({2: 4}, {2: 8}, reruns=frozenset(reruns))
    limits = Limits(budget, 13)
    assert needs_priority(limits, wants, others, overdue, rerun_waits) is needed


def test_a_waiting_rerun_of_another_run_is_served_first() -> None:
    holder = Others({2: 8}, {2: 9}, priority=(2, 8))
    assert served_elsewhere(holder, 1, rerun_waits=False)
    assert served_elsewhere(holder, 1, rerun_waits=True)  # first come, first served
    assert not served_elsewhere(Others({2: 8}, {2: 9}, priority=(1, 8)), 1, rerun_waits=False)
    rerun = Others({2: 6}, {2: 8}, reruns=frozenset({2}))
    assert served_elsewhere(rerun, 1, rerun_waits=False)
    assert not served_elsewhere(rerun, 1, rerun_waits=True)
    assert not served_elsewhere(Others({2: 6}, {2: 8}), 1, rerun_waits=False)
