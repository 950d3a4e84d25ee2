"""What a ``--dist poolaware`` run did, as plain data: per test, per lane, the lower bound."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from pytest_poolaware.advice import Candidate

#: Version of the JSON written by ``--poolaware-report`` (README: "Run report").
SCHEMA_VERSION: Final = 1
SERIAL_LANE: Final = "serial"
FANOUT_LANE: Final = "fanout"
#: Digits kept for seconds and timestamps in the JSON report.
JSON_DIGITS: Final = 6


@dataclass(frozen=True)
class ItemFacts:
    """One collected item: its markers and lane, and what was measured if it ran."""

    nodeid: str
    serial_marker: bool
    parallel_marker: bool
    lane: str
    worker: str | None = None
    start: float | None = None  # time.time() when it started (after its go)
    end: float | None = None
    duration: float | None = None  # seconds of the attempt that counted
    need: int | None = None  # peak connections checked out at once
    peak_open: int | None = None  # peak connections open in its worker, idle ones included
    waited: float | None = None  # seconds held back by the budget
    rerun: str = ""  # why it ran twice, "" if it ran once
    outcome: str | None = None  # passed, failed, skipped, error

    @property
    def measured(self) -> bool:
        return self.need is not None and self.duration is not None

    @property
    def markers(self) -> list[str]:
        names = [("serial_only", self.serial_marker), ("parallel_safe", self.parallel_marker)]
        return [name for name, present in names if present]

    def to_json(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "markers": self.markers,
            "lane": self.lane,
            "worker": self.worker,
            "start": _round(self.start),
            "end": _round(self.end),
            "duration": _round(self.duration),
            "need": self.need,
            "peak_open": self.peak_open,
            "waited": _round(self.waited),
            "rerun": self.rerun or None,
            "outcome": self.outcome,
        }


@dataclass(frozen=True)
class LaneTime:
    """Time one lane (or worker) spent running tests, and held back by the budget."""

    items: int = 0
    running: float = 0.0
    waited: float = 0.0


def lane_times(items: Iterable[ItemFacts], key: str = "lane") -> dict[str, LaneTime]:
    """Sum durations and waits per ``lane`` (or per ``worker``) over the measured items."""
    totals: dict[str, LaneTime] = {}
    for item in items:
        name = getattr(item, key)
        if not item.measured or name is None:
            continue
        total = totals.get(name, LaneTime())
        totals[name] = LaneTime(
            total.items + 1,
            total.running + (item.duration or 0.0),
            total.waited + (item.waited or 0.0),
        )
    return totals


@dataclass(frozen=True)
class LowerBound:
    """No schedule of these tests on these workers within this budget is faster than
    ``value`` (xdist-facts.md): each term is one reason, ``binding`` names the largest."""

    serial: float  # the serial lane runs its tests one after another
    longest: float  # the longest fanned-out test
    workers: float  # the fan-out shared by the other workers (all of it, with one worker)
    connections: float  # connection-seconds over the budget

    @property
    def value(self) -> float:
        return max(self.serial, self.longest, self.workers, self.connections)

    @property
    def binding(self) -> str:
        terms = {
            "serial lane": self.serial,
            "longest test": self.longest,
            "workers": self.workers,
            "budget": self.connections,
        }
        return max(terms, key=lambda name: terms[name])

    def to_json(self) -> dict[str, Any]:
        return {
            "value": _round(self.value),
            "binding": self.binding,
            "serial": _round(self.serial),
            "longest": _round(self.longest),
            "workers": _round(self.workers),
            "connections": _round(self.connections),
        }


def lower_bound(
    workers: int,
    budget: int,
    serial: Sequence[tuple[float, int]],
    fanout: Sequence[tuple[float, int]],
) -> LowerBound:
    """LB = max(sum_S p, max_P p, sum_P p / (W - 1), sum c*p / B) over (p, c) pairs of
    measured duration and need.

    With one worker the serial lane and the fan-out share it, so the third term becomes
    the sum of all durations.
    """
    serial_sum = sum(p for p, _ in serial)
    fanout_sum = sum(p for p, _ in fanout)
    shared = fanout_sum / (workers - 1) if workers > 1 else serial_sum + fanout_sum
    connection_seconds = sum(p * c for p, c in [*serial, *fanout])
    return LowerBound(
        serial=serial_sum,
        longest=max((p for p, _ in fanout), default=0.0),
        workers=shared,
        connections=connection_seconds / budget,
    )


@dataclass(frozen=True)
class ServerView:
    """What server-side monitoring saw (``monitor.ServerMonitor``)."""

    peak: int
    samples: int
    scope: str  # which connections were counted, in words
    interval: float
    timeline: tuple[tuple[float, int], ...] = ()


@dataclass(frozen=True)
class Overrun:
    nodeid: str
    need: int
    budget: int
    alone: bool


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
    server: ServerView | None = None
    overruns: tuple[Overrun, ...] = ()
    notes: tuple[str, ...] = ()
    #: Shown as warnings (say, a configured budget the server cannot honour).
    warnings: tuple[str, ...] = ()
    advice: tuple[Candidate, ...] = ()

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
        pairs = {
            lane: [
                (item.duration or 0.0, item.need or 0)
                for item in self.measured
                if item.lane == lane
            ]
            for lane in (SERIAL_LANE, FANOUT_LANE)
        }
        return lower_bound(self.workers, self.budget, pairs[SERIAL_LANE], pairs[FANOUT_LANE])

    @property
    def wall_over_lb(self) -> float | None:
        bound = self.lower_bound.value
        return self.wall / bound if bound > 0 else None

    def top_needs(self, count: int) -> list[ItemFacts]:
        """The tests that held the most connections at once (none of those that held none)."""
        ranked = sorted(
            (item for item in self.measured if item.need),
            key=lambda item: (-(item.need or 0), -(item.duration or 0.0), item.nodeid),
        )
        return ranked[:count]

    def to_json(self) -> dict[str, Any]:
        """The ``--poolaware-report`` document (schema in the README)."""
        lanes = lane_times(self.items)
        server = self.server
        return {
            "schema_version": SCHEMA_VERSION,
            "run": {
                "workers": self.workers,
                "budget": self.budget,
                "budget_source": self.budget_source,
                "peak_open_workers": self.peak_open,
                "peak_open_server": server.peak if server else None,
                "server_scope": server.scope if server else None,
                "server_samples": server.samples if server else 0,
                "started": _round(self.started),
                "finished": _round(self.finished),
                "session": _round(self.session),
                "wall": _round(self.wall),
                "lower_bound": self.lower_bound.to_json(),
                "wall_over_lb": _round(self.wall_over_lb),
                "lanes": {
                    lane: {
                        "items": lanes.get(lane, LaneTime()).items,
                        "running": _round(lanes.get(lane, LaneTime()).running),
                        "waited": _round(lanes.get(lane, LaneTime()).waited),
                    }
                    for lane in (SERIAL_LANE, FANOUT_LANE)
                },
                "overruns": [
                    {"nodeid": o.nodeid, "need": o.need, "budget": o.budget, "alone": o.alone}
                    for o in self.overruns
                ],
                "notes": list(self.notes),
                "warnings": list(self.warnings),
            },
            "tests": [item.to_json() for item in self.items],
            "advice": [candidate.to_json() for candidate in self.advice],
            "timeline": [[_round(t), worker, n] for t, worker, n in self.timeline],
            "server_timeline": [[_round(t), n] for t, n in server.timeline] if server else [],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, JSON_DIGITS)
