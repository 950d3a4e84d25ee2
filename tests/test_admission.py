"""Admission alone (``admission.Admission``): no placement, no xdist, no database.

Items are handed to workers by hand (``queued``), as placement would; each test pins one
rule of ``docs/design.md``, "Admission". The planner's property tests
(``tests/test_core.py``) drive both parts together over random runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from pytest_poolaware.planning.admission import (
    GO_AHEAD_SECONDS,
    HANDOVER_AFTER_GOES,
    Admission,
    AdmissionAction,
    Go,
    Grant,
    Release,
)
from pytest_poolaware.shared.limits import Limits
from pytest_poolaware.shared.protocol import Answer


def admission(budget: int, needs: Mapping[int, int] | None = None) -> Admission[str]:
    """An admission whose items need 1 connection unless ``needs`` says otherwise."""
    known = dict(needs or {})
    return Admission(budget, need_of=lambda index: known.get(index, 1))


def decide(adm: Admission[str], first: str | None = None) -> list[AdmissionAction]:
    actions: list[AdmissionAction] = []
    adm.admit(actions, first=first)
    return actions


def goes(actions: list[AdmissionAction]) -> list[tuple[object, int]]:
    return [(a.worker, a.index) for a in actions if isinstance(a, Go)]


def grants(actions: list[AdmissionAction]) -> list[Grant]:
    return [a for a in actions if isinstance(a, Grant)]


def releases(actions: list[AdmissionAction]) -> set[object]:
    return {a.worker for a in actions if isinstance(a, Release)}


def running(adm: Admission[str], queues: Mapping[str, list[int]]) -> Admission[str]:
    """Workers joined with these queues, every head started."""
    for worker, queue in queues.items():
        adm.add_worker(worker)
        adm.queued(worker, queue)
    decide(adm)
    return adm


def test_an_item_starts_when_its_need_fits_and_a_head_that_does_not_reserves_its_room() -> None:
    adm = admission(5, {0: 2, 1: 2, 2: 4, 3: 2})
    for worker, queue in {"a": [0, 1], "b": [2], "c": [3]}.items():
        adm.add_worker(worker)
        adm.queued(worker, queue)
    # a's items need 2 each (its commitment is the larger need, not the sum); b's head
    # needs 4 and waits; c's would fit beside a's, but not beside b's once a's end: it
    # must not take the room b waits for
    assert goes(decide(adm)) == [("a", 0), ("a", 1)]
    assert adm.committed == 2
    adm.completed("a", 0)
    adm.completed("a", 1)
    assert goes(decide(adm)) == [("b", 2)]


def test_a_head_that_waits_for_a_running_test_anyway_lets_what_fits_beside_it_start() -> None:
    """b's head (4) fits only once a's test (2 of 5) ends, whatever else runs; c's item
    (1) fits beside b's then, so it starts now (backfill) and keeps its connections."""
    adm = admission(5, {0: 2, 1: 4, 2: 1})
    for worker, queue in {"a": [0], "b": [1], "c": [2]}.items():
        adm.add_worker(worker)
        adm.queued(worker, queue)
    adm.counts("c", 1, 1)  # an idle pooled connection from its session start
    actions = decide(adm)
    assert goes(actions) == [("a", 0), ("c", 2)]
    assert releases(actions) == set()
    adm.completed("a", 0)
    assert goes(decide(adm)) == [("b", 1)]


def test_the_first_worker_named_goes_first() -> None:
    """The planner names the serial lane's worker: the run's critical path."""
    adm = admission(2, {0: 2, 1: 2})
    for worker, index in (("a", 0), ("b", 1)):
        adm.add_worker(worker)
        adm.queued(worker, [index])
    assert goes(decide(adm, first="b")) == [("b", 1)]


def test_connects_waiting_on_each_other_the_youngest_gives_way() -> None:
    adm = running(admission(2), {"a": [0], "b": [1]})
    adm.counts("a", 1, 0)
    adm.counts("b", 1, 0)
    adm.request("a", 1)
    assert grants(decide(adm)) == []  # b runs freely: its end frees room
    adm.request("b", 2)
    assert grants(decide(adm)) == [Grant("b", 2, Answer.REFUSED)]


def test_sharing_while_the_budget_may_grow_the_runs_decide_who_gives_way() -> None:
    """Sharing the server, the run's two tests wait on each other mid-test, but another
    run may give room back: the run's request waits in the ticket queue, and nobody
    gives way until the runs decide it (``give_way``), or the budget can grow no more."""
    adm = running(admission(2), {"a": [0], "b": [1]})
    adm.set_budget(Limits(2, 6, may_pass=False))
    adm.counts("a", 1, 0)
    adm.counts("b", 1, 0)
    adm.request("a", 1)
    adm.request("b", 2)
    assert grants(decide(adm)) == []
    assert adm.set_budget(Limits(2, 6, give_way=True, may_pass=False))
    assert grants(decide(adm)) == [Grant("b", 2, Answer.REFUSED)]
    adm.request("b", 3)
    assert adm.set_budget(Limits(2, 2, may_pass=False))  # the room can give no more
    assert grants(decide(adm)) == [Grant("b", 3, Answer.REFUSED)]


def test_a_connect_alone_over_the_budget_is_let_past_it_and_reported() -> None:
    adm = running(admission(1), {"a": [0]})
    adm.counts("a", 1, 0)
    adm.request("a", 1)
    assert grants(decide(adm)) == [Grant("a", 1, Answer.OVER_BUDGET)]
    assert [(o.index, o.need, o.budget, o.alone) for o in adm.overruns] == [(0, 2, 1, True)]


def test_set_budget_says_whether_anything_changed_and_refuses_a_negative_budget() -> None:
    adm = admission(3)
    assert not adm.set_budget(Limits(3))
    assert adm.set_budget(Limits(5))
    assert adm.set_budget(Limits(5, 6))
    with pytest.raises(ValueError, match="budget must not be negative, got -1"):
        adm.set_budget(Limits(-1))
    assert adm.budget == 5


def test_the_largest_budget_in_force_counts_from_the_first_go() -> None:
    """The lower bound's B: a stand-in budget replaced before any item started was
    never in force; once items run, a budget that went up and down again was."""
    adm = admission(10)
    adm.add_worker("a")
    adm.set_budget(Limits(4))  # the server was learned before anything started
    assert adm.largest_budget == 4
    adm.queued("a", [0])
    assert goes(decide(adm)) == [("a", 0)]
    adm.set_budget(Limits(6))
    adm.set_budget(Limits(3))
    assert (adm.budget, adm.largest_budget) == (3, 6)


def test_a_budget_lowered_below_what_is_held_starts_nothing_asks_idle_back_and_converges() -> None:
    adm = running(admission(4, {0: 2, 1: 2, 2: 2, 3: 2}), {"a": [0, 1], "b": [2, 3]})
    adm.counts("a", 2, 1)  # a's item has one of its two connections idle
    adm.counts("b", 2, 0)
    assert adm.committed == 4
    assert adm.set_budget(Limits(2))
    actions = decide(adm)
    # Nothing waits, yet the idle connection is asked back: the run is over its budget.
    assert releases(actions) == {"a"}
    assert goes(actions) == []
    # b asks for a third connection: beyond what it was granted, so it waits.
    adm.request("b", 7, item=2)
    assert grants(decide(adm)) == []
    adm.counts("a", 1, 0, released=True)
    # a's items end: the run is back at 2 (b's), and a's queue stays held.
    adm.completed("a", 0)
    adm.completed("a", 1)
    adm.counts("a", 0, 0)
    adm.queued("a", [4])
    assert adm.committed == 2
    actions = decide(adm)
    assert goes(actions) == []
    # Nothing else runs: b's item is alone over the budget, and let past it.
    assert grants(actions) == [Grant("b", 7, Answer.OVER_BUDGET)]
    assert [(o.index, o.alone) for o in adm.overruns] == [(2, True)]
    # b's items end: the run is under the budget, and starts again within it.
    adm.completed("b", 2)
    adm.completed("b", 3)
    adm.counts("b", 0, 0)
    assert goes(decide(adm)) == [("a", 4)]
    assert adm.committed <= 2


def test_a_budget_raised_again_lets_held_items_start_at_once() -> None:
    adm = running(admission(2, {0: 2, 1: 2}), {"a": [0], "b": [1]})
    assert adm.running("a") == 0
    assert adm.running("b") is None  # b's head waits for a's room
    assert adm.set_budget(Limits(4))
    assert goes(decide(adm)) == [("b", 1)]


def test_a_budget_of_0_starts_nothing_grants_nothing_and_lets_nothing_past() -> None:
    """Another run's request, first in the ticket queue, needs the whole room: this run
    starts nothing and grants no connect, not even alone, until its budget grows."""
    adm = running(admission(2, {0: 1, 1: 1, 2: 1}), {"a": [0], "b": [1]})
    adm.counts("a", 1, 0)
    adm.counts("b", 1, 0)
    assert adm.set_budget(Limits(0, 13))
    adm.completed("b", 1)
    adm.counts("b", 0, 0)
    adm.queued("b", [2])
    adm.request("a", 7, item=0)
    actions = decide(adm)
    assert goes(actions) == []
    assert grants(actions) == []
    adm.completed("a", 0)
    adm.counts("a", 0, 0)
    actions = decide(adm)  # nothing runs: still nothing past the budget
    assert goes(actions) == []
    assert adm.set_budget(Limits(1, 13))
    assert goes(decide(adm)) == [("b", 2)]


def test_idle_connections_are_asked_back_only_once_per_answer() -> None:
    adm = running(admission(2, {0: 1, 1: 1}), {"a": [0], "b": [1]})
    adm.counts("a", 2, 1)
    adm.set_budget(Limits(1))
    assert releases(decide(adm)) == {"a"}
    assert releases(decide(adm)) == set()
    adm.counts("a", 2, 1, released=True)  # its pool could not give it back
    assert releases(decide(adm)) == set()
    adm.completed("a", 0)  # once an item ends, it may have something to give
    assert releases(decide(adm)) == {"a"}


def _turns(
    budget: int, first: str | None = None, b_needs: int = 1
) -> tuple[Admission[str], list[int]]:
    """Worker a holds one connection (a persistent one, say) and has many items queued;
    b holds none and its head (needing ``b_needs``) waits for room. Returns admission
    and a's items."""
    mine = list(range(2 * HANDOVER_AFTER_GOES))
    adm = admission(budget, {100: b_needs, 101: b_needs})
    adm.add_worker("a")
    adm.queued("a", mine[:1])
    assert goes(decide(adm, first)) == [("a", 0)]
    adm.counts("a", 1, 0)
    adm.add_worker("b")
    adm.queued("b", [100, 101])
    decide(adm, first)
    adm.queued("a", mine[1:])
    return adm, mine


def test_with_fewer_connections_than_workers_they_take_turns_keeping_their_connections() -> None:
    """Budget 1, two workers: handing a's connection to b at every test would close and
    reopen it each time. a keeps it for its turn while b's head waits; then hands it over
    and b has a turn."""
    adm, mine = _turns(1)
    for index in mine[1 : HANDOVER_AFTER_GOES + 1]:
        adm.completed("a", index - 1)
        adm.counts("a", 1, 1)  # between tests: its connection idle, not given back
        actions = decide(adm)
        assert goes(actions) == [("a", index)]
        assert releases(actions) == set()
    adm.completed("a", HANDOVER_AFTER_GOES)
    adm.counts("a", 1, 1)
    actions = decide(adm)  # b has waited a turn: a's next test waits, a gives back
    assert goes(actions) == []
    assert releases(actions) == {"a"}
    adm.counts("a", 0, 0, released=True)
    assert goes(decide(adm)) == [("b", 100)]
    adm.counts("b", 1, 0)
    adm.completed("b", 100)
    adm.counts("b", 1, 1)
    assert goes(decide(adm)) == [("b", 101)]  # b's turn: a waits


def test_goes_ahead_of_time_pin_a_workers_connections_for_a_quarter_second_at_most() -> None:
    """A go cannot be taken back: a head that comes to wait for room waits for every go
    already given. Found on a suite of 0.1 s tests beside 6-connection ones, where the
    heavy test waited 1.2 s behind light tests queued with their goes."""
    adm: Admission[str] = Admission(
        3, need_of=lambda index: 3 if index == 100 else 1, seconds_of=lambda _: 0.1
    )
    adm.add_worker("a")
    adm.queued("a", range(10))
    ahead = round(GO_AHEAD_SECONDS / 0.1 + 0.5)  # goes until that many seconds are ahead
    assert goes(decide(adm)) == [("a", i) for i in range(1 + ahead)]
    adm.counts("a", 1, 0)
    adm.add_worker("b")
    adm.queued("b", [100])
    assert goes(decide(adm)) == []  # b's head needs the whole budget: it waits
    for index in range(ahead):
        adm.completed("a", index)
        assert goes(decide(adm)) == []
    adm.completed("a", ahead)
    adm.counts("a", 0, 0, released=True)
    assert goes(decide(adm)) == [("b", 100)]


def test_a_worker_holding_no_connections_gets_every_queued_go_at_once() -> None:
    """Its goes pin nothing, and a completion then needs no plan (``settled``)."""
    adm: Admission[str] = Admission(3, need_of=lambda index: 0, seconds_of=lambda _: 0.1)
    adm.add_worker("a")
    adm.queued("a", range(10))
    assert goes(decide(adm)) == [("a", i) for i in range(10)]
    assert adm.settled()


def test_with_enough_connections_for_every_worker_a_waiting_head_reserves_at_once() -> None:
    """Budget 2 with two workers: no turns; b's head needs 2 and reserves its room, so a
    gives back its idle connection rather than start its next test within it."""
    adm, _ = _turns(2, b_needs=2)
    adm.completed("a", 0)
    adm.counts("a", 1, 1)
    actions = decide(adm)
    assert goes(actions) == []
    assert releases(actions) == {"a"}


def test_turns_never_keep_the_serial_lane_waiting() -> None:
    adm, _ = _turns(1, first="b")
    adm.completed("a", 0)
    adm.counts("a", 1, 1)
    actions = decide(adm, first="b")
    assert goes(actions) == []
    assert releases(actions) == {"a"}


def test_a_rerun_sharing_the_server_waits_for_the_room_it_asks_for() -> None:
    """Sharing the server: a test known to need 7 started while the budget was 7, then gave
    way; meanwhile another run's share grew and this run's budget fell to 5. The rerun
    is not started on 5: it would grow mid-test, where it cannot give way, and could
    wait on another run's rerun until both gates timed out. It waits (its run asks for
    the room in the ticket queue), and once the budget is 7 it is granted all 7."""
    adm = admission(7, {0: 7})
    adm.set_budget(Limits(7, 13))
    adm.add_worker("a")
    adm.queued("a", [0])
    assert goes(decide(adm)) == [("a", 0)]
    adm.request("a", 1, want=7, item=0)  # the first attempt gave way, its connections closed
    adm.set_budget(Limits(5, 13, may_pass=False))
    assert grants(decide(adm)) == []
    assert adm.largest_waiting_need() == 7
    adm.set_budget(Limits(7, 13, may_pass=False))
    assert grants(decide(adm)) == [Grant("a", 1)]
    assert adm.committed == 7
    for request in range(2, 9):
        adm.request("a", request, item=0)
        assert grants(decide(adm)) == [Grant("a", request)]
        adm.counts("a", request - 1, 0)
    adm.completed("a", 0)
    adm.counts("a", 0, 0)
    assert adm.committed == 0


def test_a_rerun_asks_for_no_more_than_the_budget_may_grow_to() -> None:
    """A rerun asks for the run's own budget (15); sharing a room of 13, it is granted 13
    once the budget has grown that far (the rest of the room: other runs' own
    connections), not kept waiting for room that does not exist."""
    adm = admission(15, {0: 3})
    adm.set_budget(Limits(5, 13))
    adm.add_worker("a")
    adm.queued("a", [0])
    assert goes(decide(adm)) == [("a", 0)]
    adm.request("a", 1, want=15, item=0)
    assert grants(decide(adm)) == []
    assert adm.largest_waiting_need() == 13  # what its run asks the other runs for
    adm.set_budget(Limits(13, 13))
    assert grants(decide(adm)) == [Grant("a", 1)]
    assert adm.committed == 13


def test_a_rerun_waiting_for_a_connection_is_said_so() -> None:
    """Sharing the server, a run whose rerun waits mid-test asks to be served first: the
    rerun cannot give way, a first attempt can. A rerun waiting to start, holding
    nothing, or a first attempt waiting for a connection, is no such case."""
    adm = admission(4, {0: 2, 1: 2})
    for worker, index in (("a", 0), ("b", 1)):
        adm.add_worker(worker)
        adm.queued(worker, [index])
    decide(adm)
    adm.request("a", 1, want=4, item=0)
    decide(adm)
    assert adm.mid_test_waits() == (None, False)  # it waits for b to drain, holding nothing
    adm.completed("b", 1)
    assert grants(decide(adm)) == [Grant("a", 1)]
    adm.set_budget(Limits(4, 12))
    for request in range(2, 6):  # the 4 connections it was granted
        adm.request("a", request, item=0)
        assert grants(decide(adm)) == [Grant("a", request)]
        adm.counts("a", request - 1, 0)
    assert adm.mid_test_waits() == (None, False)
    adm.request("a", 6, item=0)  # a fifth: the budget may grow, and so the rerun waits
    assert grants(decide(adm)) == []
    assert adm.mid_test_waits() == (0, True)


def test_a_first_attempt_waiting_mid_test_is_said_so_but_not_a_pool_s_own_connect() -> None:
    """Across runs, tests holding connections and waiting for more may wait on each
    other (the ticket queue's wait-die): a pool growing in its own thread is no such
    test, it is delayed, never refused."""
    adm = running(admission(2, {0: 2, 1: 2}), {"a": [0]})
    adm.set_budget(Limits(2, 4))  # another run may give its share back: it waits
    adm.counts("a", 2, 0)
    adm.request("a", 1, item=0, background=True)
    assert grants(decide(adm)) == []
    assert adm.mid_test_waits() == (None, False)
    adm.request("a", 2, item=0)
    assert grants(decide(adm)) == []
    assert adm.mid_test_waits() == (0, False)


def test_a_head_waiting_for_the_budget_to_grow_reserves_nothing_and_asks_idle_back() -> None:
    """Sharing the server: the budget is 4 of a room that may grow to 12. The serial
    lane's head needs 7: no draining of this run's tests can make it room, only other
    runs giving back theirs. So it reserves nothing: the light tests go on within the 4,
    and idle connections are asked back (held, they would keep this run's share). Once
    the budget reaches 7, the head reserves as any other."""
    adm = admission(4, {0: 7, 1: 7})
    adm.set_budget(Limits(4, 12))
    for worker, queue in {"lane": [0, 1], "a": [10, 11], "b": [20]}.items():
        adm.add_worker(worker)
        adm.queued(worker, queue)
    adm.counts("b", 1, 1)  # an idle pooled connection
    actions = decide(adm, first="lane")
    assert goes(actions) == [("a", 10), ("a", 11), ("b", 20)]
    assert releases(actions) == {"b"}
    assert adm.largest_waiting_need() == 7  # what the run asks the others for
    adm.set_budget(Limits(7, 12))
    assert goes(decide(adm, first="lane")) == []  # it reserves: a and b drain
    for worker, index in (("a", 10), ("a", 11), ("b", 20)):
        adm.completed(worker, index)
    adm.counts("b", 0, 0, released=True)
    assert goes(decide(adm, first="lane"))[0] == ("lane", 0)
