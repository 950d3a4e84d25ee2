"""Admission's bookkeeping of one worker alone (``holders.Holder``): counts, grants and
requests as they arrive out of order. No decisions, no xdist."""

from __future__ import annotations

from collections import deque

from pytest_poolaware.planning.holders import Holder, Request, RequestKind

CONNECT = RequestKind.CONNECT
RERUN = RequestKind.RERUN


def holding(*queue: int, open_: int = 0) -> Holder:
    """A worker with these items queued, every one go'ed with a need of 1."""
    holder = Holder(order=1, queue=deque(queue), open=open_)
    for _ in queue:
        holder.start(1)
    return holder


def test_counts_older_than_those_taken_are_ignored_but_a_release_answer_counts() -> None:
    holder = Holder(order=1)
    assert holder.take_counts(2, 1, released=False, version=5)
    assert not holder.take_counts(1, 0, released=False, version=4)  # sent before, late
    assert (holder.open, holder.idle) == (2, 1)
    holder.release_sent = True
    # Not news, yet it answers the release: what is idle now could not be given back.
    assert holder.take_counts(2, 1, released=True, version=5)
    assert (holder.release_sent, holder.stuck_idle) == (False, 1)


def test_a_granted_connect_counts_until_its_connection_shows_up() -> None:
    holder = holding(0)
    request = Request("w", 1, order=1, kind=CONNECT, item=0)
    holder.ask(request)
    holder.answer(request, refused=False)
    assert (holder.floor, holder.connecting, holder.floor_item) == (1, 1, 0)
    assert holder.requests == []
    assert holder.take_counts(1, 0, released=False, version=1)
    assert (holder.connecting, holder.commitment()) == (0, 1)


def test_a_late_completion_keeps_what_the_next_item_was_granted() -> None:
    """Item 1 asks (so item 0 has ended) before item 0's completion arrives."""
    holder = holding(0, 1)
    request = Request("w", 1, order=1, kind=CONNECT, item=1)
    holder.ask(request)
    holder.answer(request, refused=False)
    holder.complete(0, expected=1)
    assert (holder.floor, holder.floor_item, holder.granted) == (1, 1, 1)
    holder.complete(1, expected=1)
    assert (holder.floor, holder.connecting, holder.floor_item, holder.granted) == (0, 0, None, 0)


def test_a_later_items_request_voids_the_earlier_ones_but_not_a_pools() -> None:
    """A request left unanswered (its wait timed out) is void once its item is over; a
    pool's background connect still waits in the pool's thread: it passes on."""
    holder = holding(0, 1)
    stale = Request("w", 1, order=1, kind=CONNECT, item=0)
    pool = Request("w", 2, order=2, kind=CONNECT, item=0, background=True)
    holder.ask(stale)
    holder.ask(pool)
    holder.ask(Request("w", 3, order=3, kind=CONNECT, item=1))
    assert [r.request for r in holder.requests] == [2, 3]
    assert pool.item == 1


def test_while_its_rerun_waits_a_worker_is_committed_to_what_it_holds_only() -> None:
    holder = Holder(order=1, queue=deque([0]), open=1)
    holder.start(3)
    assert holder.commitment() == 3
    rerun = Request("w", 1, order=1, kind=RERUN, want=4, item=0)
    holder.ask(rerun)
    assert holder.commitment() == 1  # it starts nothing before its rerun is granted
    assert holder.wants(lambda index: 3, most=13) == 4
    assert holder.wants(lambda index: 3, most=2) == 2  # no more than the budget may grow to
    holder.answer(rerun, refused=False)
    assert (holder.commitment(), holder.rerunning) == (4, True)


def test_a_head_let_past_the_budget_is_the_only_go() -> None:
    holder = Holder(order=1, queue=deque([5, 6]), waiting_since=3)
    holder.start_alone(9)
    assert (holder.granted, holder.waiting_since, holder.granted_need()) == (1, 0, 9)
