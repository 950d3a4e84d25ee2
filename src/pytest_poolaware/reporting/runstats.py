"""What a ``--dist poolaware`` run did, as plain data: per test, per lane, the lower bound."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from pytest_poolaware.planning.core import Lane, Overrun
from pytest_poolaware.planning.lowerbound import LowerBound, lower_bound
from pytest_poolaware.reporting.findings import Stall, cause_of, why
from pytest_poolaware.shared.markers import UNMARKED, Markers
from pytest_poolaware.shared.protocol import ItemMeasures
from pytest_poolaware.shared.server_view import ServerView

K = TypeVar("K", bound=Hashable)

#: Version of the JSON written by ``--poolaware-report`` (README: "Run report").
SCHEMA_VERSION: Final = 1
#: Digits kept for seconds and timestamps in the JSON report.
JSON_DIGITS: Final = 6


@dataclass(frozen=True)
class ItemResult:
    """What the controller learned about one finished item."""

    nodeid: str
    lane: Lane
    worker: str
    measures: ItemMeasures
    #: The parts of its waits (``measures.waits``) during which another run sharing the
    #: server held this run back (``time.time()`` spans, in order).
    held_back: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class RunSnapshot:
    """What the scheduler knows of the run, frozen for reporting
    (``PoolAwareScheduling.snapshot``)."""

    workers: int  # asked for (``-n``)
    collection: tuple[str, ...] = ()  # node ids, in collection order
    markers: tuple[Markers, ...] = ()  # per item, as the workers reported them
    lanes: tuple[Lane, ...] = ()  # per item, as planned
    results: tuple[ItemResult, ...] = ()  # per finished attempt, in the order they ended
    overruns: tuple[Overrun, ...] = ()
    #: Connects kept waiting at the gate while the budget had room for them (faults).
    stalls: tuple[Stall, ...] = ()
    peak_open: int = 0  # most connections open at once over all workers
    #: (time.time(), worker id, open connections) each time a worker's count changed.
    timeline: tuple[tuple[float, str, int], ...] = ()
    #: (time.time(), budget) when the run began and each time the budget in force moved.
    budgets: tuple[tuple[float, int], ...] = ()
    notes: tuple[str, ...] = ()
    #: ``poolaware_order`` and the fan-out's placement this run used, and how many tests
    #: had a learned duration to place them by (0: a cold run).
    order: str = ""
    placement: str = ""
    learned: int = 0
    #: The largest budget in force since the first item's go (0: not known).
    largest_budget: int = 0
    #: Per item, the relative's need it started with when it had none of its own
    #: (``planning.priors``; empty: none did).
    priors: tuple[int | None, ...] = ()


@dataclass(frozen=True)
class Candidate:
    """A definition (test function or class) that should carry ``marker`` (``advice``)."""

    marker: str
    target: str  # node id of the function (parameters stripped) or of the class
    need: int  # most connections any of its tests held at once
    tests: int  # collected tests it covers
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "marker": self.marker,
            "target": self.target,
            "need": self.need,
            "tests": self.tests,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ItemFacts:
    """One collected item: its markers and lane, and what was measured if it ran."""

    nodeid: str
    markers: Markers = UNMARKED
    lane: Lane = Lane.FANOUT
    worker: str | None = None
    start: float | None = None  # time.time() when it started (after its go)
    end: float | None = None
    duration: float | None = None  # seconds of the attempt that counted
    need: int | None = None  # peak connections checked out at once
    peak_open: int | None = None  # peak connections open in its worker, idle ones included
    waited: float | None = None  # seconds held back by the budget
    #: Of ``waited``: for its go, before it started; and at the connect gate, inside
    #: ``duration`` (its threads waiting at once count once).
    go_wait: float | None = None
    gate_wait: float | None = None
    rerun: str = ""  # why it ran twice, "" if it ran once
    outcome: str | None = None  # passed, failed, skipped, error
    #: (start, end) of each wait for the budget long enough to show (the trace only).
    waits: tuple[tuple[float, float], ...] = ()
    #: The parts of ``waits`` during which another run sharing the server held this run
    #: back (the report gives their sum, the trace marks them).
    held_back: tuple[tuple[float, float], ...] = ()
    drivers: tuple[str, ...] = ()  # drivers of the connections it used
    leaks: int = 0  # connections its code opened or checked out and still held at its end
    #: The need of a relative it was planned with, not measured yet itself (``priors``).
    prior: int | None = None

    @property
    def measured(self) -> bool:
        return self.need is not None and self.duration is not None

    @property
    def held_back_by_runs(self) -> float | None:
        """Seconds of its waits during which another run held this one back (None: it
        did not run)."""
        if self.worker is None:
            return None
        return sum(end - start for start, end in self.held_back)

    @property
    def net_duration(self) -> float:
        """Its duration without its time at the connect gate: what the lower bound counts
        (the waiting depends on the schedule, so a better one could have saved it)."""
        return max(0.0, (self.duration or 0.0) - (self.gate_wait or 0.0))

    def to_json(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "markers": self.markers.names,
            "xdist_group": self.markers.xdist_group or None,
            "lane": self.lane.value,
            "worker": self.worker,
            "start": _round(self.start),
            "end": _round(self.end),
            "duration": _round(self.duration),
            "need": self.need,
            "peak_open": self.peak_open,
            "waited": _round(self.waited),
            "go_wait": _round(self.go_wait),
            "gate_wait": _round(self.gate_wait),
            "held_back_by_runs": _round(self.held_back_by_runs),
            "rerun": self.rerun or None,
            "outcome": self.outcome,
            "drivers": list(self.drivers),
            "leaks": self.leaks,
            "prior": self.prior,
        }


@dataclass(frozen=True)
class LaneTime:
    """Time one lane (or worker) spent running tests, and held back by the budget: of
    that, waiting for a go and at the connect gate (inside ``running``)."""

    items: int = 0
    running: float = 0.0
    waited: float = 0.0
    go_wait: float = 0.0
    gate_wait: float = 0.0


def lane_times(items: Iterable[ItemFacts]) -> dict[Lane, LaneTime]:
    """Sum durations and waits per lane over the measured items."""
    return _times(items, lambda item: item.lane)


def worker_times(items: Iterable[ItemFacts]) -> dict[str, LaneTime]:
    """Sum durations and waits per worker over the measured items."""
    return _times(items, lambda item: item.worker)


def _times(items: Iterable[ItemFacts], key: Callable[[ItemFacts], K | None]) -> dict[K, LaneTime]:
    totals: dict[K, LaneTime] = {}
    for item in items:
        name = key(item)
        if not item.measured or name is None:
            continue
        total = totals.get(name, LaneTime())
        totals[name] = LaneTime(
            total.items + 1,
            total.running + (item.duration or 0.0),
            total.waited + (item.waited or 0.0),
            total.go_wait + (item.go_wait or 0.0),
            total.gate_wait + (item.gate_wait or 0.0),
        )
    return totals


#: Seconds an excess of the server's count over the workers' must last to be reported as
#: connections the workers did not count: shorter ones are opens and closes in flight
#: between the two views.
UNCOUNTED_HOLD: Final = 0.25


@dataclass(frozen=True)
class Uncounted:
    """The server's count for the run's login against the workers' own (when monitored)."""

    most: int  # most connections the workers did not count, held UNCOUNTED_HOLD or longer
    end_server: int  # at the last sample
    end_workers: int  # the workers' last counts, summed


def uncounted(
    workers: Sequence[tuple[float, str, int]],
    server: Sequence[tuple[float, int]],
    hold: float = UNCOUNTED_HOLD,
) -> Uncounted:
    """Connections the server saw that the workers did not count (subprocesses, drivers
    that are not hooked): a blind spot made visible instead of silent."""
    last: dict[str, int] = {}
    changes = sorted(workers)
    excess: list[tuple[float, int]] = []
    i = 0
    for at, count in server:
        while i < len(changes) and changes[i][0] <= at:
            last[changes[i][1]] = changes[i][2]
            i += 1
        excess.append((at, count - sum(last.values())))
    for _, worker, open_ in changes[i:]:
        last[worker] = open_
    most = 0
    for j, (start, _) in enumerate(excess):
        low = None
        for at, value in excess[j:]:
            low = value if low is None else min(low, value)
            if at - start >= hold:
                most = max(most, low)
                break
    return Uncounted(
        most=most,
        end_server=server[-1][1] if server else 0,
        end_workers=sum(last.values()),
    )


@dataclass(frozen=True)
class RunStats:
    """Everything the summary, the JSON report, the timeline and the advice are made of."""

    budget: int
    budget_source: str
    workers: int
    items: tuple[ItemFacts, ...]
    peak_open: int
    started: float  # session start and end, time.time()
    finished: float
    timeline: tuple[tuple[float, str, int], ...] = ()
    #: (time.time(), budget) when the run began and each time the budget in force moved.
    budgets: tuple[tuple[float, int], ...] = ()
    server: ServerView | None = None
    overruns: tuple[Overrun, ...] = ()
    #: Connects kept waiting at the gate while the budget had room for them (faults).
    stalls: tuple[Stall, ...] = ()
    notes: tuple[str, ...] = ()
    #: Shown as warnings (say, a configured budget the server cannot honour).
    warnings: tuple[str, ...] = ()
    advice: tuple[Candidate, ...] = ()
    #: Why the ``serial_only`` candidates of ``advice`` are not advised ("": they are).
    advice_withheld: str = ""
    #: ``poolaware_order`` and the fan-out's placement (``fanout.Placement``) this run
    #: used, and how many tests had a learned duration to place them by (0: cold).
    order: str = ""
    placement: str = ""
    learned: int = 0
    #: The largest budget in force since the first item's go, the lower bound's B
    #: (0: not known, ``budget`` stands for it).
    largest_budget: int = 0
    #: Seconds another run sharing the server held this one back (tests waiting at once
    #: count once; None: no other run was met).
    held_back_by_runs: float | None = None

    @property
    def priors(self) -> int:
        """Tests not measured yet planned with a relative's need."""
        return sum(1 for item in self.items if item.prior is not None)

    @property
    def measured(self) -> list[ItemFacts]:
        return [item for item in self.items if item.measured]

    @property
    def wall(self) -> float:
        """First test start to last test end: worker startup and collection excluded."""
        ran = [item for item in self.items if item.start is not None and item.end is not None]
        if not ran:
            return 0.0
        return max(i.end or 0.0 for i in ran) - min(i.start or 0.0 for i in ran)

    @property
    def session(self) -> float:
        return max(0.0, self.finished - self.started)

    @property
    def lower_bound(self) -> LowerBound:
        """``planning.lowerbound``'s bound over the measured tests, their durations net of
        their time at the connect gate, B the largest budget in force during the run."""
        pairs = {
            lane: [
                (item.net_duration, item.need or 0) for item in self.measured if item.lane == lane
            ]
            for lane in Lane
        }
        budget = self.largest_budget or self.budget
        return lower_bound(self.workers, budget, pairs[Lane.SERIAL], pairs[Lane.FANOUT])

    @property
    def wall_over_lb(self) -> float | None:
        bound = self.lower_bound.value
        return self.wall / bound if bound > 0 else None

    @property
    def uncounted(self) -> Uncounted | None:
        if self.server is None:
            return None
        return uncounted(self.timeline, self.server.timeline)

    @property
    def leaking(self) -> list[ItemFacts]:
        """Tests that ended holding connections their own code opened or checked out."""
        return [item for item in self.items if item.leaks]

    def nodeid_of(self, overrun: Overrun) -> str:
        """The node id of the test an overrun names ("?" if it is not in the collection)."""
        return self.nodeid_at(overrun.index)

    def nodeid_at(self, index: int) -> str:
        """The node id of the test at ``index`` in the collection ("?" if none is)."""
        return self.items[index].nodeid if 0 <= index < len(self.items) else "?"

    def top_needs(self, count: int) -> list[ItemFacts]:
        """The tests that held the most connections at once (none of those that held none)."""
        ranked = sorted(
            (item for item in self.measured if item.need),
            key=lambda item: (-(item.need or 0), -(item.duration or 0.0), item.nodeid),
        )
        return ranked[:count]

    def to_json(self) -> dict[str, Any]:
        """The ``--poolaware-report`` document (schema in the README)."""
        server = self.server
        return {
            "schema_version": SCHEMA_VERSION,
            "run": {
                "workers": self.workers,
                "budget": self.budget,
                "budget_source": self.budget_source,
                "order": self.order,
                "placement": self.placement,
                "learned": self.learned,
                "priors": self.priors,
                "peak_open_workers": self.peak_open,
                "peak_open_server": server.peak if server else None,
                "server_scope": server.scope if server else None,
                "server_samples": server.samples if server else 0,
                "uncounted": _uncounted_json(self.uncounted),
                "started": _round(self.started),
                "finished": _round(self.finished),
                "session": _round(self.session),
                "wall": _round(self.wall),
                "lower_bound": _bound_json(self.lower_bound),
                "wall_over_lb": _round(self.wall_over_lb),
                "held_back_by_runs": _round(self.held_back_by_runs),
                "lanes": _lanes_json(lane_times(self.items)),
                "overruns": [self._overrun_json(o) for o in self.overruns],
                "stalls": [self._stall_json(s) for s in self.stalls],
                "notes": list(self.notes),
                "warnings": list(self.warnings),
                "advice_withheld": self.advice_withheld or None,
            },
            "tests": [item.to_json() for item in self.items],
            "advice": [candidate.to_json() for candidate in self.advice],
            "timeline": [[_round(t), worker, n] for t, worker, n in self.timeline],
            "server_timeline": [[_round(t), n] for t, n in server.timeline] if server else [],
            "budget_timeline": [[_round(t), n] for t, n in self.budgets],
        }

    def _stall_json(self, stall: Stall) -> dict[str, Any]:
        return {
            "worker": stall.worker,
            "nodeid": self.nodeid_at(stall.item) if stall.item >= 0 else None,
            "waited": _round(stall.waited),
            "cause": stall.cause,
            "gave_up": stall.gave_up,
        }

    def _overrun_json(self, overrun: Overrun) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid_of(overrun),
            "need": overrun.need,
            "budget": overrun.budget,
            "alone": overrun.alone,
            "outside": list(overrun.outside),
            "in_tests": overrun.in_tests,
            "cause": cause_of(overrun).value,
            "why": why(overrun),
        }


def _lanes_json(lanes: dict[Lane, LaneTime]) -> dict[str, dict[str, Any]]:
    """Every lane, an empty one included."""
    spent = {lane: lanes.get(lane, LaneTime()) for lane in Lane}
    return {
        lane.value: {
            "items": time.items,
            "running": _round(time.running),
            "waited": _round(time.waited),
            "go_wait": _round(time.go_wait),
            "gate_wait": _round(time.gate_wait),
        }
        for lane, time in spent.items()
    }


def _uncounted_json(value: Uncounted | None) -> dict[str, int] | None:
    if value is None:
        return None
    return {"most": value.most, "end_server": value.end_server, "end_workers": value.end_workers}


def _bound_json(bound: LowerBound) -> dict[str, Any]:
    return {
        "value": _round(bound.value),
        "binding": bound.binding,
        "serial": _round(bound.serial),
        "longest": _round(bound.longest),
        "workers": _round(bound.workers),
        "connections": _round(bound.connections),
        "conflicts": _round(bound.conflicts),
        "budget": bound.budget,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, JSON_DIGITS)
