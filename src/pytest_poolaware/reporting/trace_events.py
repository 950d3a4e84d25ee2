"""The run in the Chrome trace event format, for Perfetto (ui.perfetto.dev) and chrome://tracing.

A suite of thousands of tests does not fit one picture: these viewers zoom from the whole
run to one worker's second. The file is the format's JSON object form: ``traceEvents``
holds one process (the run) with one thread per worker (``M`` metadata events name them),
each test a complete ``X`` span on its worker's thread with its node id (category
``serial`` for the serial lane, ``fanout`` for the rest), each wait for the budget an ``X``
span of its own (category ``wait``; the parts of it during which another run sharing the
server held this one back are spans of their own, named so), and counters (``C``) for
every worker's open connections, the budget and, when monitored, the server's count.
Times are microseconds from the session's start. Tests that never ran are instant events
(``i``) on a thread of their own, so every collected test is in the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, Final

from pytest_poolaware.planning.core import Lane
from pytest_poolaware.reporting.runstats import ItemFacts, RunStats
from pytest_poolaware.reporting.timeline import stacked_steps, worker_order

#: The one process of the trace: the run.
PID: Final = 1
PROCESS_NAME: Final = "pytest-poolaware run"
#: Thread ids: the workers get 1, 2, ... in worker order; tests that never ran get this one.
NOT_RUN_TID: Final = 0
NOT_RUN_TRACK: Final = "not run"
#: Categories of the spans: the lanes' names from ``runstats``, and the waits.
WAIT_CATEGORY: Final = "wait"
WAIT_NAME: Final = "waiting for the connection budget"
HELD_BACK_NAME: Final = "held back by another run"
#: Counter names (each counter's series are the keys of its ``args``).
OPEN_COUNTER: Final = "open connections"
BUDGET_COUNTER: Final = "connection budget"
SERVER_COUNTER: Final = "server connections"
MICROSECONDS: Final = 1_000_000
#: Digits kept of a microsecond.
DIGITS: Final = 3


def render(stats: RunStats) -> str:
    """The trace as a JSON document."""
    return json.dumps(trace(stats), separators=(",", ":")) + "\n"


def trace(stats: RunStats) -> dict[str, Any]:
    """The trace event format's JSON object for one run."""
    t0 = stats.started

    def us(when: float) -> float:
        return round((when - t0) * MICROSECONDS, DIGITS)

    workers = sorted(
        {item.worker for item in stats.items if item.worker} | {w for _, w, _ in stats.timeline},
        key=worker_order,
    )
    tid = {worker: k + 1 for k, worker in enumerate(workers)}
    events = [_meta("process_name", NOT_RUN_TID, name=PROCESS_NAME), *_tracks(stats, tid)]
    spans, not_run = _tests(stats, tid, us)
    if not_run:
        events.append(_meta("thread_name", NOT_RUN_TID, name=NOT_RUN_TRACK))
        events.append(_meta("thread_sort_index", NOT_RUN_TID, sort_index=len(workers) + 1))
    events += spans + not_run
    events += _counters(stats, workers, us)
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "tool": "pytest-poolaware",
            "started": stats.started,
            "workers": stats.workers,
            "budget": stats.budget,
            "budget_source": stats.budget_source,
            "tests": len(stats.items),
        },
    }


def _tracks(stats: RunStats, tid: dict[str, int]) -> list[dict[str, Any]]:
    """A named track per worker, in worker order; those of the serial lane say so."""
    serial_workers = {
        item.worker for item in stats.items if item.lane is Lane.SERIAL and item.worker
    }
    events = []
    for worker, number in tid.items():
        title = f"{worker} (ran serial lane tests)" if worker in serial_workers else worker
        events.append(_meta("thread_name", number, name=title))
        events.append(_meta("thread_sort_index", number, sort_index=number))
    return events


def _tests(
    stats: RunStats, tid: dict[str, int], us: Callable[[float], float]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The tests that ran, with their waits, as spans on their workers' tracks (in order
    on each); and those that never ran, as instants at the session's end."""
    spans: list[dict[str, Any]] = []
    not_run: list[dict[str, Any]] = []
    for item in stats.items:
        if item.worker is None or item.start is None or item.end is None:
            not_run.append(_instant(item, us(stats.finished)))
            continue
        spans.append(_span(item, tid[item.worker], us(item.start), us(item.end)))
        spans += [
            _wait(item, tid[item.worker], us(start), us(end), held)
            for wait in merged(item.waits)
            for start, end, held in held_back_parts(wait, item.held_back)
        ]
    spans.sort(key=lambda event: (event["tid"], event["ts"], -event["dur"]))
    return spans, not_run


def merged(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of ``spans`` as disjoint (start, end) spans, in order.

    A test that opens connections from several threads or tasks waits at the gate for
    each of them at once; on its worker's track the waits must not overlap (viewers
    nest the spans of one track), and what matters there is when the worker was held.
    """
    union: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if union and start <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], end))
        else:
            union.append((start, end))
    return union


def held_back_parts(
    wait: tuple[float, float], held_back: Iterable[tuple[float, float]]
) -> list[tuple[float, float, bool]]:
    """One wait cut at the spans during which another run held this one back (disjoint,
    in order): (start, end, held back) for each part, in order, together the wait."""
    cursor, end = wait
    parts: list[tuple[float, float, bool]] = []
    for held_start, held_end in held_back:
        start, stop = max(held_start, cursor), min(held_end, end)
        if start >= stop:
            continue
        if cursor < start:
            parts.append((cursor, start, False))
        parts.append((start, stop, True))
        cursor = stop
    if cursor < end or not parts:
        parts.append((cursor, end, False))
    return parts


def _meta(kind: str, tid: int, **args: Any) -> dict[str, Any]:
    """A metadata event: ``process_name``, ``thread_name`` or ``thread_sort_index``."""
    return {"name": kind, "ph": "M", "pid": PID, "tid": tid, "args": args}


def _span(item: ItemFacts, tid: int, start: float, end: float) -> dict[str, Any]:
    return {
        "name": item.nodeid,
        "cat": item.lane.value,
        "ph": "X",
        "pid": PID,
        "tid": tid,
        "ts": start,
        "dur": max(0.0, round(end - start, DIGITS)),
        "args": _args(item),
    }


def _wait(item: ItemFacts, tid: int, start: float, end: float, held: bool) -> dict[str, Any]:
    return {
        "name": HELD_BACK_NAME if held else WAIT_NAME,
        "cat": WAIT_CATEGORY,
        "ph": "X",
        "pid": PID,
        "tid": tid,
        "ts": start,
        "dur": max(0.0, round(end - start, DIGITS)),
        "args": {"nodeid": item.nodeid},
    }


def _instant(item: ItemFacts, when: float) -> dict[str, Any]:
    return {
        "name": item.nodeid,
        "cat": item.lane.value,
        "ph": "i",
        "s": "t",
        "pid": PID,
        "tid": NOT_RUN_TID,
        "ts": when,
        "args": _args(item),
    }


def _args(item: ItemFacts) -> dict[str, Any]:
    return {
        "nodeid": item.nodeid,
        "lane": item.lane.value,
        "markers": item.markers.names,
        "outcome": item.outcome,
        "need": item.need,
        "peak_open": item.peak_open,
        "waited_s": item.waited,
        "held_back_by_runs_s": item.held_back_by_runs,
        "rerun": item.rerun or None,
    }


def _counters(
    stats: RunStats, workers: list[str], us: Callable[[float], float]
) -> list[dict[str, Any]]:
    """Open connections per worker (one series each, so viewers can stack them), the
    budget as it moved (a flat line when it never did), and the server's samples."""

    def counter(name: str, when: float, values: dict[str, int]) -> dict[str, Any]:
        return {
            "name": name,
            "ph": "C",
            "pid": PID,
            "tid": NOT_RUN_TID,
            "ts": us(when),
            "args": values,
        }

    steps = stats.budgets or ((stats.started, stats.budget),)
    end = max(stats.finished, stats.started)
    points = [(stats.started, steps[0][1]), *steps[1:], (end, steps[-1][1])]
    events = [counter(BUDGET_COUNTER, when, {"budget": n}) for when, n in points]
    if workers:
        for when, counts in stacked_steps(stats.timeline, workers, stats.started):
            events.append(counter(OPEN_COUNTER, when, dict(zip(workers, counts, strict=True))))
    if stats.server is not None:
        events += [
            counter(SERVER_COUNTER, when, {"server": n}) for when, n in stats.server.timeline
        ]
    return events
