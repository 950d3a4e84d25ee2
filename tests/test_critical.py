"""The serial lane first (``planning.critical``; ``docs/design.md``, "Admission", rule 4):
the lane's next test never waits for a fan-out test, a fan-out test that fits beside no
serial test runs in a gap of the lane rather than reserving room while the lane runs, and
nothing starves. Driven through the simulator of ``test_core`` on the clock of
``test_lowerbound``."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import example, given, note
from hypothesis import strategies as st
from test_core import HYPOTHESIS_PATCH_WARNING, PROPERTY_SETTINGS, SEEDS, Event
from test_lowerbound import TIME_RESOLUTION, TimedSim

from pytest_poolaware.planning.admission import Admission, AdmissionAction, Go, Release
from pytest_poolaware.planning.core import ItemSpec as Item
from pytest_poolaware.planning.core import Lane
from pytest_poolaware.planning.critical import LaneAhead, LaneItem
from pytest_poolaware.planning.placement import MIN_QUEUE

SERIAL, FANOUT = Lane.SERIAL, Lane.FANOUT


class ReadySim(TimedSim):
    """``TimedSim`` that also records when each item could have started: its worker
    entered it (it holds the next item or a shutdown, its previous item ended) and waits
    for nothing but the go."""

    def __init__(self, tests: Sequence[Item], **options: Any) -> None:
        self.ready_at: dict[int, float] = {}
        super().__init__(tests, **options)

    def events(self) -> list[Event]:
        # Before the clock moves on: the state after the last step is the one at ``now``.
        for w in self.workers.values():
            entered = w.queue and (len(w.queue) >= MIN_QUEUE or w.shut or not self.strict_xdist)
            if w.running is None and entered:
                self.ready_at.setdefault(w.queue[0], self.now)
        return super().events()

    def lane_end(self) -> float:
        """When the serial lane's last test ended (0: no serial lane)."""
        return max((t for i, t in self.ended_at.items() if self.is_serial(i)), default=0.0)

    def go_wait(self, index: int) -> float:
        return self.started_at[index] - self.ready_at[index]


def run_ready(run: dict[str, Any], seed: int) -> ReadySim:
    rng = random.Random(seed)
    sim = ReadySim(**run)
    sim.run(lambda events: rng.randrange(len(events)))
    sim.assert_sound()
    return sim


#: The demo's shape (issue 22): a serial lane of 8-connection tests, one unmarked
#: 12-connection test (12 + 8 > 15: it fits beside no serial test), light tests, budget
#: 15, 4 workers; the light tests keep what they open, as the demo's pools do.
DEMO: dict[str, Any] = {
    "tests": [Item(SERIAL, 8)] * 6
    + [Item(FANOUT, 1)] * 4
    + [Item(FANOUT, 12)]
    + [Item(FANOUT, 1)] * 13,
    "budget": 15,
    "workers": 4,
    "peaks": [8] * 6 + [1] * 4 + [12] + [1] * 13,
    "times": [1.0] * 6 + [0.25] * 4 + [0.5] + [0.25] * 13,
}


# -- the demo's shape -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_the_demo_s_heavy_unmarked_test_costs_the_lane_its_own_duration(seed: int) -> None:
    """Its 12 connections fit beside no serial test: it reserves nothing while the lane
    runs, takes a gap between two of the lane's tests, with room kept for it from the
    moment it is chosen, and the lane waits for its half second only."""
    sim = run_ready(DEMO, seed)
    heavy = 10
    serial = sorted((i for i in sim.ended_at if sim.is_serial(i)), key=sim.started_at.__getitem__)
    ends = {sim.ended_at[i] for i in serial}
    assert sim.started_at[heavy] in ends  # at the end of one of the lane's tests
    waits = {i: sim.go_wait(i) for i in serial}
    assert sorted(waits.values()) == [0.0] * 5 + [pytest.approx(0.5)]
    # 6 s of lane and the heavy test's own half second: nothing else on the path.
    assert sim.wall() == pytest.approx(6.5)


def lane(worker: str, *items: tuple[int, int | None]) -> LaneAhead[str]:
    """The lane's tests still to start, each taking a second (as do fan-out tests)."""
    return LaneAhead(worker, tuple(LaneItem(i, need, 1.0) for i, need in items), lambda _: 1.0)


def admit(
    adm: Admission[str], lane: LaneAhead[str] | None, **options: Any
) -> list[tuple[str, int]]:
    actions: list[AdmissionAction] = []
    adm.admit(actions, first=None if lane is None else lane.worker, lane=lane, **options)
    return [(str(a.worker), a.index) for a in actions if isinstance(a, Go)]


def demo_admission() -> Admission[str]:
    """The lane's worker gw0 runs serial test 0 (8); its next, 1, needs 8 too; gw1's head
    is the 12-connection test 2; gw2 and gw3 run light tests (1 each)."""
    needs = {0: 8, 1: 8, 2: 12, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1}
    adm: Admission[str] = Admission(15, need_of=lambda i: needs.get(i, 1))
    for worker, queue in (("gw0", [0, 1]), ("gw1", [2, 5]), ("gw2", [3, 6]), ("gw3", [4, 7])):
        adm.add_worker(worker)
        adm.queued(worker, queue)
    return adm


LANE = lane("gw0", (0, 8), (1, 8))


def test_a_test_that_fits_beside_no_serial_test_reserves_nothing_while_the_lane_runs() -> None:
    adm = demo_admission()
    assert admit(adm, LANE) == [
        ("gw0", 0),
        ("gw0", 1),
        ("gw2", 3),
        ("gw2", 6),
        ("gw3", 4),
        ("gw3", 7),
    ]
    assert adm.largest_waiting_need() == 12  # a run sharing the server may ask for it
    adm.completed("gw0", 0)
    adm.completed("gw2", 3)
    # The lane's next test had its go all along; the light tests go on beside it.
    assert admit(adm, lane("gw0", (1, 8))) == []
    adm.completed("gw0", 1)
    adm.completed("gw2", 6)
    adm.completed("gw3", 4)
    adm.completed("gw3", 7)
    # The lane is done: the heavy test starts in its gap.
    assert admit(adm, None) == [("gw1", 2), ("gw1", 5)]


def test_idle_connections_that_would_keep_the_gap_s_test_out_are_asked_back_ahead() -> None:
    """gw0 runs a 6-connection serial test, its next needs 6 too; gw1's head needs 12
    (it takes the lane's next gap); gw2 runs a light test but kept 5 idle connections of
    its previous one: 12 + 6 > 15 when the lane's test ends, so gw2 is asked for them
    back now, not the lane's worker nor the gap's."""
    needs = {0: 6, 1: 6, 2: 12, 3: 1}
    adm: Admission[str] = Admission(15, need_of=lambda i: needs.get(i, 1))
    for worker, queue in (("gw0", [0, 1]), ("gw1", [2]), ("gw2", [3])):
        adm.add_worker(worker)
        adm.queued(worker, queue)
    ahead = lane("gw0", (0, 6), (1, 6))
    assert admit(adm, ahead) == [("gw0", 0), ("gw0", 1), ("gw2", 3)]
    adm.counts("gw0", 6, 1)
    adm.counts("gw1", 1, 1)
    adm.counts("gw2", 6, 5)
    actions: list[AdmissionAction] = []
    adm.admit(actions, first="gw0", lane=ahead)
    assert {a.worker for a in actions if isinstance(a, Release)} == {"gw2"}
    # With nothing idle beside the gap's test, nothing is asked back.
    adm.counts("gw2", 1, 0, released=True)
    actions = []
    adm.admit(actions, first="gw0", lane=ahead)
    assert not [a for a in actions if isinstance(a, Release)]


def test_room_for_the_lane_s_next_test_is_kept_while_its_current_test_runs() -> None:
    """gw0 runs a 2-connection serial test; its next needs 8: other workers may take only
    15 - 8 = 7 meanwhile, so the next one starts the moment the current one ends."""
    needs = {0: 2, 1: 8, 2: 4, 3: 4, 4: 4}
    adm: Admission[str] = Admission(15, need_of=lambda i: needs.get(i, 1))
    for worker, queue in (("gw0", [0, 1]), ("gw1", [2]), ("gw2", [3]), ("gw3", [4])):
        adm.add_worker(worker)
        adm.queued(worker, queue)
    ahead = lane("gw0", (0, 2), (1, 8))
    # Without the kept room all three 4s would start (2 + 12 <= 15).
    assert admit(adm, ahead) == [("gw0", 0), ("gw1", 2)]
    adm.completed("gw0", 0)
    assert admit(adm, lane("gw0", (1, 8))) == [("gw0", 1)]


def test_a_next_test_of_unknown_need_keeps_no_room() -> None:
    needs = {0: 2, 1: 8, 2: 4, 3: 4, 4: 4}
    adm: Admission[str] = Admission(15, need_of=lambda i: needs.get(i, 1))
    for worker, queue in (("gw0", [0, 1]), ("gw1", [2]), ("gw2", [3]), ("gw3", [4])):
        adm.add_worker(worker)
        adm.queued(worker, queue)
    ahead = lane("gw0", (0, 2), (1, None))
    assert admit(adm, ahead) == [("gw0", 0), ("gw1", 2), ("gw2", 3), ("gw3", 4)]


def test_a_worker_that_cannot_start_its_head_reserves_nothing() -> None:
    """xdist enters an item only once the worker holds the next one or a shutdown: until
    then a head that does not fit holds no room for itself."""
    needs = {0: 3, 1: 4, 2: 1}
    adm: Admission[str] = Admission(4, need_of=lambda i: needs.get(i, 1))
    for worker, queue in (("a", [0]), ("b", [1]), ("c", [2])):
        adm.add_worker(worker)
        adm.queued(worker, queue)
    assert admit(adm, None, can_start=lambda w: w != "b") == [("a", 0), ("c", 2)]
    adm2: Admission[str] = Admission(4, need_of=lambda i: needs.get(i, 1))
    for worker, queue in (("a", [0]), ("b", [1]), ("c", [2])):
        adm2.add_worker(worker)
        adm2.queued(worker, queue)
    # Able to start, b's head reserves its room: c's light test waits for it.
    assert admit(adm2, None) == [("a", 0)]


# -- properties -----------------------------------------------------------------------------


def shape(run: dict[str, Any], seed: int) -> str:
    """A failing run in one line: (lane, need, duration) of each test, budget, workers."""
    tests = [(t.lane.value[0], t.need, t.duration) for t in run["tests"]]
    return f"{tests} budget={run['budget']} workers={run['workers']} seed={seed}"


@st.composite
def lane_runs(draw: st.DrawFn) -> dict[str, Any]:
    """A run whose needs are all known and met exactly (what a warm run plans with), on a
    fixed budget, without crashes: a serial lane and fan-out tests, some heavy."""
    budget = draw(st.integers(2, 15))
    n = draw(st.integers(2, 20))
    lanes = draw(st.lists(st.sampled_from([SERIAL, FANOUT, FANOUT]), min_size=n, max_size=n))
    needs = draw(st.lists(st.integers(0, budget), min_size=n, max_size=n))
    times = draw(st.lists(st.floats(0.0, 3.0), min_size=n, max_size=n))
    groups = draw(st.lists(st.sampled_from(["m1", "m2", "m3"]), min_size=n, max_size=n))
    return {
        "tests": [
            Item(lane, need, t, group)
            for lane, need, t, group in zip(lanes, needs, times, groups, strict=True)
        ],
        "budget": budget,
        "workers": draw(st.integers(2, 4)),
        "peaks": needs,
        "times": times,
    }


@pytest.mark.filterwarnings(HYPOTHESIS_PATCH_WARNING)
@PROPERTY_SETTINGS
@given(run=lane_runs(), seed=SEEDS)
@example(run=DEMO, seed=0)
def test_the_serial_lane_waits_only_for_a_test_in_its_gap(run: dict[str, Any], seed: int) -> None:
    """With needs known and met, a serial test starts the moment its worker can start
    it, unless a fan-out test that fits beside neither it nor the lane's test before it
    took the gap: then it waits for that test's own duration only (for such tests one
    after another at most), never for a reservation or for light tests to drain."""
    note(shape(run, seed))
    sim = run_ready(run, seed)
    lane = sorted((i for i in sim.ended_at if sim.is_serial(i)), key=lambda i: sim.started_at[i])
    waits = {i: sim.go_wait(i) for i in lane}
    note(f"{waits}")
    for before, index in zip([None, *lane], lane, strict=False):
        if waits[index] <= TIME_RESOLUTION:
            continue
        needs = [sim.peaks[i] for i in (before, index) if i is not None]
        gaps = [
            (sim.started_at[i], sim.ended_at[i])
            for i in sim.ended_at
            if not sim.is_serial(i) and any(sim.peaks[i] + n > sim.budget for n in needs)
        ]
        assert covered(sim.ready_at[index], sim.started_at[index], gaps), (index, waits)


def covered(start: float, end: float, spans: list[tuple[float, float]]) -> bool:
    """Whether ``spans`` (start, end), one after another, cover ``start`` to ``end``."""
    now = start
    while now < end - TIME_RESOLUTION:
        reaching = [b for a, b in spans if a <= now + TIME_RESOLUTION and b > now]
        if not reaching:
            return False
        now = max(reaching)
    return True


def drawn(spec: list[tuple[str, int, float]], budget: int, workers: int) -> dict[str, Any]:
    """A ``lane_runs`` draw from its one-line shape (``shape``)."""
    tests = [Item(SERIAL if lane == "s" else FANOUT, n, t, "m1") for lane, n, t in spec]
    times = [t for _, _, t in spec]
    return {
        "tests": tests,
        "budget": budget,
        "workers": workers,
        "peaks": [n for _, n, _ in spec],
        "times": times,
    }


#: Found by hypothesis: a worker whose 14-connection test ended went on to a light test
#: it had its go for ahead of time, keeping the 14 idle connections for that test's 2 s
#: while another worker's light test had waited since the lane's end.
IDLE_HELD_PAST_A_WAITING_HEAD = drawn(
    [
        ("f", 0, 1.0), ("f", 10, 0.0), ("s", 6, 0.0), ("f", 14, 2.0), ("f", 0, 1.0),
        ("s", 0, 0.0), ("s", 0, 0.0), ("s", 0, 0.0), ("f", 2, 0.0), ("f", 0, 0.0),
        ("s", 0, 0.0), ("f", 1, 2.0), ("s", 1, 0.0), ("s", 0, 2.0), ("f", 3, 2.0),
        ("f", 0, 1.0), ("f", 1, 0.0),
    ],
    budget=14,
    workers=3,
)  # fmt: skip


@pytest.mark.filterwarnings(HYPOTHESIS_PATCH_WARNING)
@PROPERTY_SETTINGS
@given(run=lane_runs(), seed=SEEDS)
@example(run=DEMO, seed=0)
@example(run=IDLE_HELD_PAST_A_WAITING_HEAD, seed=0)
def test_no_test_starves_past_the_end_of_the_serial_lane(run: dict[str, Any], seed: int) -> None:
    """Every test starts once its worker can start it, or once the lane is done, plus
    the time the tests running then take to end: one test per worker at most (each
    head ahead of it, oldest first, and what runs beside it)."""
    note(shape(run, seed))
    sim = run_ready(run, seed)
    longest = max(run["times"])
    for index in sim.ended_at:
        if sim.is_serial(index):
            continue
        since = max(sim.ready_at[index], sim.lane_end())
        assert sim.started_at[index] <= since + run["workers"] * longest + TIME_RESOLUTION, index
