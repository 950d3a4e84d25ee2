"""The progress rules between runs sharing a server (``server.share_progress``): the
head of the ticket queue gives its request up once its leases stop growing. The
no-progress rule for stopped runs is checked against the server in test_sharing.py."""

from __future__ import annotations

from pytest_poolaware.server.share_progress import HeadPatience


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_head_whose_leases_stop_growing_gives_its_request_up_until_it_ends() -> None:
    clock = Clock()
    patience = HeadPatience(30.0, clock)
    patience.step(head=True, slots=4)
    clock.now += 20
    patience.step(head=True, slots=6)  # it grew: the wait starts again
    clock.now += 25
    patience.step(head=True, slots=6)
    assert not patience.gave_up
    assert patience.asked(12, more_than_any=16) == 12
    clock.now += 10
    patience.step(head=True, slots=6)
    assert (patience.gave_up, patience.times) == (True, 1)
    assert patience.asked(12, more_than_any=16) == 16  # left out by every run
    assert patience.asked(0, more_than_any=16) == 0  # the request ended
    assert patience.asked(12, more_than_any=16) == 12  # a new one is asked for again


def test_only_the_head_runs_out_of_patience() -> None:
    clock = Clock()
    patience = HeadPatience(30.0, clock)
    patience.step(head=False, slots=4)
    clock.now += 60
    patience.step(head=False, slots=4)
    patience.step(head=True, slots=4)
    assert not patience.gave_up
