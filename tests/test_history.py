"""Learned needs survive contention: a jump is confirmed before it is trusted."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from pytest_poolaware.planning.history import History, Measure

NODE = "test_x.py::test_x"


def test_a_first_clean_sighting_is_trusted() -> None:
    history = History()
    history.record(NODE, 8, 1.0)
    assert history.get(NODE) == Measure(8, 1.0)


def test_a_need_that_goes_down_is_trusted_at_once() -> None:
    history = History({NODE: Measure(8, 1.0)})
    history.record(NODE, 3, 0.5, contended=True)
    assert history.get(NODE) == Measure(3, 0.5)


def test_a_jump_waits_for_a_later_run_and_is_trusted_at_the_smaller_sighting() -> None:
    history = History({NODE: Measure(8, 1.0)})
    history.record(NODE, 14, 1.0)
    assert history.get(NODE) == Measure(8, 1.0, pending=14)
    history.record(NODE, 10, 1.0)
    assert history.get(NODE) == Measure(10, 1.0)


def test_a_contended_attempt_never_raises_a_trusted_need() -> None:
    history = History({NODE: Measure(8, 1.0)})
    for seen in (14, 15, 14):
        history.record(NODE, seen, 1.0, contended=True)
        assert history.get(NODE) == Measure(8, 1.0, pending=14)
    history.record(NODE, 8, 1.0)  # then a run alone
    assert history.get(NODE) == Measure(8, 1.0)


def test_a_first_sighting_under_contention_is_confirmed_by_the_next_run() -> None:
    history = History()
    history.record(NODE, 15, 1.0, contended=True)
    assert history.get(NODE) == Measure(None, 1.0, pending=15)
    history.record(NODE, 1, 0.1)
    assert history.get(NODE) == Measure(1, 0.1)


def test_pending_sightings_survive_the_cache() -> None:
    history = History({NODE: Measure(8, 1.0, pending=14), "b": Measure(None, 2.0, pending=3)})
    data = json.loads(json.dumps(history.to_json()))
    assert data["tests"] == {NODE: [8, 1.0, 14], "b": [None, 2.0, 3]}
    again = History.from_json(data)
    assert again.get(NODE) == Measure(8, 1.0, pending=14)
    assert again.get("b") == Measure(None, 2.0, pending=3)
    assert not again.problems


def test_malformed_pending_entries_are_dropped() -> None:
    data = {"schema": 1, "tests": {"a": [None, 1.0], "b": [1, 1.0, -2], "c": [1, 1.0, 2, 3]}}
    history = History.from_json(data)
    assert len(history) == 0
    assert history.problems == ["ignored 3 malformed entries in the learned data"]


@given(
    st.integers(0, 20),
    st.lists(st.tuples(st.integers(0, 40), st.booleans()), max_size=12),
)
def test_contention_alone_never_lifts_a_need_above_what_clean_runs_saw(
    clean: int, sightings: list[tuple[int, bool]]
) -> None:
    history = History({NODE: Measure(clean, 1.0)})
    ceiling = clean
    for need, contended in sightings:
        history.record(NODE, need, 1.0, contended=contended)
        if not contended:
            ceiling = max(ceiling, need)
        measure = history.get(NODE)
        assert measure is not None
        assert measure.need is not None
        assert measure.need <= ceiling
