"""The arithmetic of runs sharing one server's room (``server.share_plan``): fair shares,
the priority, one run's step towards its share, and the leases of runs just gone. Checked
without a server; the runs themselves share one in test_sharing.py."""

from __future__ import annotations

import pytest

from pytest_poolaware.server.share_plan import (
    TICKET_MODULUS,
    DepartedRuns,
    Others,
    Recent,
    SafeBudget,
    Ticket,
    fair_shares,
    gives_way,
    kept_by_others,
    older,
    plan,
    shares_with_priority,
    ticket_order,
)


def test_fair_shares_give_what_is_asked_and_split_the_rest_evenly() -> None:
    assert fair_shares(14, {1: 15}) == {1: 14}
    assert fair_shares(14, {1: 15, 2: 15}) == {1: 7, 2: 7}
    assert fair_shares(14, {1: 3, 2: 15}) == {1: 3, 2: 11}
    assert fair_shares(5, {2: 9, 1: 9}) == {1: 3, 2: 2}  # the same split seen from both
    assert fair_shares(0, {1: 4}) == {1: 0}
    assert fair_shares(6, {1: 0, 2: 2}) == {1: 0, 2: 2}


def test_the_head_of_the_queue_is_served_first_down_to_none_for_the_others() -> None:
    assert shares_with_priority(14, {1: 15, 2: 15}, (2, 12)) == {1: 2, 2: 12}
    assert shares_with_priority(14, {1: 1, 2: 15}, (2, 12)) == {1: 1, 2: 13}
    assert shares_with_priority(14, {1: 15, 2: 15, 3: 4}, (2, 13)) == {1: 1, 2: 13, 3: 0}
    assert shares_with_priority(14, {1: 15, 2: 15}, (2, 14)) == {1: 0, 2: 14}
    assert shares_with_priority(14, {1: 15}, (9, 12)) == {1: 14}  # a run that has gone


def test_the_head_never_counts_on_what_tests_waiting_mid_test_hold() -> None:
    """Run 3's test holds 4 and waits mid-test: it cannot give them back. The head (run
    2) gets what runs 1 and 3 leave; run 1's share drops to make room for the head."""
    assert shares_with_priority(12, {1: 4, 2: 8, 3: 5}, (2, 8), {3: 4}) == {1: 0, 2: 8, 3: 4}
    # In a room of 10, run 3's 4 leave the head 6 of the 8 it asked for.
    assert shares_with_priority(10, {1: 4, 2: 8, 3: 5}, (2, 8), {3: 4}) == {1: 0, 2: 6, 3: 4}


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


def test_a_run_with_work_left_keeps_its_last_lease_unless_the_head_needs_it() -> None:
    heavy = Others({2: 13}, {2: 15}, (Ticket(2, 5, 12),))
    step = plan(me=1, allows=16, held=1, demand=3, in_use=0, others=heavy, live_others=13)
    assert (step.hold, step.budget) == (1, 1)
    whole = Others({2: 13}, {2: 15}, (Ticket(2, 5, 13),))
    step = plan(me=1, allows=16, held=1, demand=3, in_use=0, others=whole, live_others=13)
    assert (step.hold, step.budget) == (0, 0)  # it starts nothing until the head is served
    step = plan(me=1, allows=16, held=1, demand=3, in_use=1, others=whole, live_others=13)
    assert (step.hold, step.budget) == (1, 0)  # what its tests hold stays leased


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


def test_tickets_are_served_oldest_first_tests_waiting_mid_test_before_all() -> None:
    assert older(5, 6)
    assert not older(6, 5)
    assert not older(5, 5)
    assert older(TICKET_MODULUS - 1, 3)  # the server's clock wrapped between the two
    young, old, tie = Ticket(1, 900, 4), Ticket(2, 100, 8), Ticket(3, 900, 2)
    rerun = Ticket(4, 950, 3, stuck=True, rerun=True)
    stuck = Ticket(5, 990, 6, stuck=True)
    assert ticket_order([young, tie, old]) == (old, young, tie)
    assert ticket_order([young, stuck, rerun, old]) == (rerun, stuck, old, young)


def test_a_request_for_more_than_the_room_holds_nobody_back() -> None:
    """Run 2 asks for 14 while run 1 is there (each run's own connection and the closing
    slot leave 13): served first, it would stop run 1 for nothing. It waits for run 1
    to end, and run 1 keeps its fair share meanwhile."""
    queue = (Ticket(2, 100, 14),)
    step = plan(
        me=1, allows=16, held=6, demand=8, in_use=6,
        others=Others({2: 7}, {2: 15}, queue), live_others=7,
    )  # fmt: skip
    assert (step.share, step.budget) == (7, 7)  # 13 split evenly, the odd one to run 1


def test_a_step_names_the_head_of_the_queue() -> None:
    alone = plan(me=1, allows=16, held=0, demand=3, in_use=0, others=NOBODY, live_others=0)
    assert alone.head is None
    queue = ticket_order([Ticket(2, 100, 8), Ticket(1, 50, 12)])
    step = plan(
        me=1, allows=16, held=4, demand=12, in_use=4, others=Others({2: 5}, {2: 9}, queue),
        live_others=5,
    )  # fmt: skip
    assert step.head == 1


LEASES = {1: 4, 2: 5, 3: 3}  # test leases per run; the pool of 13 is full but for one


@pytest.mark.parametrize(
    ("queue", "me", "yields"),
    [
        # Run 2 (oldest) and run 1 wait mid-test; run 3 runs tests that will end: its 3
        # leases and the free one cover the head's 4 more: nobody gives way.
        ((Ticket(2, 1, 9, stuck=True), Ticket(1, 2, 5, stuck=True)), 1, False),
        # The head lacks 6: only run 1's leases can make it up: run 1 gives way.
        ((Ticket(2, 1, 11, stuck=True), Ticket(1, 2, 5, stuck=True)), 1, True),
        ((Ticket(2, 1, 11, stuck=True), Ticket(1, 2, 5, stuck=True)), 2, False),  # the head
        ((Ticket(2, 1, 11, stuck=True), Ticket(1, 2, 5, stuck=True)), 3, False),  # not stuck
        # Three wait mid-test: only the youngest gives way first.
        (
            (Ticket(2, 1, 11, stuck=True), Ticket(1, 2, 5, stuck=True), Ticket(3, 3, 4, True)),
            1,
            False,
        ),
        (
            (Ticket(2, 1, 11, stuck=True), Ticket(1, 2, 5, stuck=True), Ticket(3, 3, 4, True)),
            3,
            True,
        ),
        # Only a test waiting to start is older: the one waiting mid-test goes first.
        (ticket_order([Ticket(2, 1, 11), Ticket(1, 2, 5, stuck=True)]), 1, False),
        # A waiting rerun's ticket goes first, however young: it never gives way, the
        # older first attempt does.
        (ticket_order([Ticket(2, 1, 11, stuck=True), Ticket(1, 2, 9, True, True)]), 2, True),
        (ticket_order([Ticket(2, 1, 11, stuck=True), Ticket(1, 2, 9, True, True)]), 1, False),
    ],
)
def test_a_test_waiting_mid_test_gives_way_only_to_an_older_one_it_keeps_out(
    queue: tuple[Ticket, ...], me: int, yields: bool
) -> None:
    assert gives_way(me, queue, LEASES, 13) is yields


def test_a_run_whose_test_must_give_way_is_told_so_by_its_step() -> None:
    queue = (Ticket(2, 1, 11, stuck=True), Ticket(1, 2, 5, stuck=True))
    others = Others({2: 6, 3: 4}, {2: 12, 3: 6}, queue)
    step = plan(me=1, allows=16, held=4, demand=5, in_use=4, others=others, live_others=11)
    assert step.give_way


def test_connections_not_the_run_s_count_at_their_highest_of_late() -> None:
    """A worker's close reaches the server before the controller: the server's count less
    the run's own dips for a moment, and must not read as room."""
    outside = Recent(1.0)
    assert outside.update(2, 10.0) == (2, 2)
    assert outside.update(0, 10.3) == (2, 0)
    assert outside.update(0, 10.9) == (2, 0)
    assert outside.update(0, 11.1) == (0, 0)
    assert outside.update(3, 11.2) == (3, 0)


def test_connections_closing_a_moment_after_their_leases_do_not_shrink_the_room() -> None:
    """Run 2 gave back 4 leases whose connections are still closing: they count against
    what this run may take now, not against the room the runs share out."""
    others = Others({2: 3}, {2: 4})
    closing = plan(
        me=1, allows=16, held=6, demand=9, in_use=6, others=others,
        live_others=7, steady_others=3,
    )  # fmt: skip
    assert closing.reachable == 13
    assert closing.hold == 7  # the one slot they leave free, until they are gone
    gone = plan(me=1, allows=16, held=6, demand=9, in_use=6, others=others, live_others=3)
    assert gone.hold == 9
