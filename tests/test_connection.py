"""The plugin's own connection: its query deadline counts the time the process ran."""

from __future__ import annotations

from pytest_poolaware.server.connection import QueryWaits


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def waits(clock: FakeClock) -> QueryWaits:
    return QueryWaits(15.0, interval=0.5, pause_after=2.0, clock=clock)


def look_every_interval(queries: QueryWaits, clock: FakeClock, seconds: float) -> bool:
    """Let ``seconds`` pass in the watchdog's steps; whether a look found a query late."""
    late = False
    for _ in range(round(seconds / 0.5)):
        clock.now += 0.5
        late = queries.overdue() or late
    return late


def test_a_query_waiting_past_the_deadline_is_overdue() -> None:
    clock = FakeClock()
    queries = waits(clock)
    queries.begin()
    assert not look_every_interval(queries, clock, 15.0)
    assert look_every_interval(queries, clock, 1.0)


def test_an_ended_query_is_never_overdue() -> None:
    clock = FakeClock()
    queries = waits(clock)
    queries.end(queries.begin())
    assert not look_every_interval(queries, clock, 30.0)


def test_time_the_process_was_stopped_does_not_count() -> None:
    """Stopped for a minute (SIGSTOP, a debugger) with a query under way: the first look
    once resumed comes 60 s after the last. The query has waited 1 s of the process's
    time, not 61 s; it is late only once it has waited the deadline while running."""
    clock = FakeClock()
    queries = waits(clock)
    queries.begin()
    clock.now += 0.5
    assert not queries.overdue()
    clock.now += 60.0
    assert not queries.overdue()
    assert not look_every_interval(queries, clock, 13.5)
    assert look_every_interval(queries, clock, 1.0)


def test_a_look_that_comes_a_little_late_still_counts_the_wait() -> None:
    """A busy machine delays the watchdog's looks by less than the pause threshold: those
    seconds are the query's wait, as a network stall under load must still be cut."""
    clock = FakeClock()
    queries = waits(clock)
    queries.begin()
    looks = []
    for _ in range(7):
        clock.now += 2.4  # 1.9 s late each time: under pause_after
        looks.append(queries.overdue())
    assert looks == [False] * 6 + [True]  # 14.4 s is not yet late, 16.8 s is
