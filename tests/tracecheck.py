"""Offline check of a ``--poolaware-trace`` file against the trace event format.

The fields checked are the ones the format's documentation (the "Trace Event Format"
document that Perfetto and chrome://tracing read) requires of each phase used here:
the JSON object form with a ``traceEvents`` list; every event has ``name``, ``ph``,
integer ``pid`` and ``tid``; ``X`` (complete) events a microsecond ``ts`` and ``dur``;
``i`` (instant) events a ``ts`` and a scope ``s`` of ``g``, ``p`` or ``t``; ``C``
(counter) events a ``ts`` and numeric ``args`` (one series each); ``M`` (metadata)
events one of the metadata names with its ``args`` key.

    python tests/tracecheck.py TRACE.json [REPORT.json]

checks the trace and, given the run's ``--poolaware-report``, that it holds every test of
the report exactly once as a test span or a not-run instant. Exits 1 listing the problems.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

PHASES = {"X", "i", "C", "M"}
INSTANT_SCOPES = {"g", "p", "t"}
METADATA_ARG = {
    "process_name": "name",
    "thread_name": "name",
    "process_sort_index": "sort_index",
    "thread_sort_index": "sort_index",
}
#: Microseconds by which two spans' ends may disagree (rounding of ts and dur).
NESTING_SLACK = 0.01
#: Spans that are not tests (waits for the budget).
NON_TEST_CATEGORIES = {"wait"}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def problems(doc: Any) -> list[str]:
    """What in ``doc`` (a parsed trace) breaks the format; empty when it is valid."""
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        return ["not a JSON object with a traceEvents list"]
    found = []
    for n, event in enumerate(doc["traceEvents"]):
        where = f"event {n} ({event.get('ph') if isinstance(event, dict) else event!r})"
        if not isinstance(event, dict):
            found.append(f"{where}: not an object")
            continue
        phase = event.get("ph")
        if phase not in PHASES:
            found.append(f"{where}: unexpected phase {phase!r}")
            continue
        if not isinstance(event.get("name"), str) or not event["name"]:
            found.append(f"{where}: no name")
        for key in ("pid", "tid"):
            if not _is_int(event.get(key)):
                found.append(f"{where}: {key} is not an integer")
        if phase != "M" and not (_is_number(event.get("ts")) and event["ts"] >= 0):
            found.append(f"{where}: ts is not a non-negative number of microseconds")
        args = event.get("args", {})
        if not isinstance(args, dict):
            found.append(f"{where}: args is not an object")
            continue
        is_test = phase in ("X", "i") and event.get("cat") not in NON_TEST_CATEGORIES
        if is_test and not isinstance(args.get("nodeid"), str):
            found.append(f"{where}: a test without args.nodeid")
        if phase == "X" and not (_is_number(event.get("dur")) and event["dur"] >= 0):
            found.append(f"{where}: dur is not a non-negative number of microseconds")
        elif phase == "i" and event.get("s") not in INSTANT_SCOPES:
            found.append(f"{where}: instant scope s is not one of g, p, t")
        elif phase == "C" and (not args or not all(_is_number(v) for v in args.values())):
            found.append(f"{where}: a counter needs numeric args")
        elif phase == "M":
            wanted = METADATA_ARG.get(event.get("name", ""))
            if wanted is None or wanted not in args:
                found.append(f"{where}: metadata {event.get('name')!r} without args.{wanted}")
    # Nesting is only checked once every event has its fields.
    return found or _nesting(doc["traceEvents"])


def _nesting(events: list[dict[str, Any]]) -> list[str]:
    """Spans on one thread must nest (a viewer stacks them): each either ends before the
    next starts or holds it whole."""
    tracks: dict[tuple[int, int], list[tuple[float, float, str]]] = {}
    for event in events:
        if event["ph"] == "X":
            start = event["ts"]
            tracks.setdefault((event["pid"], event["tid"]), []).append(
                (start, start + event["dur"], event["name"])
            )
    found = []
    for (pid, tid), spans in tracks.items():
        open_: list[tuple[float, float, str]] = []
        for start, end, name in sorted(spans, key=lambda s: (s[0], -s[1])):
            while open_ and open_[-1][1] <= start + NESTING_SLACK:
                open_.pop()
            if open_ and end > open_[-1][1] + NESTING_SLACK:
                found.append(f"pid {pid} tid {tid}: {name!r} overlaps {open_[-1][2]!r}")
            open_.append((start, end, name))
    return found


def nodeids_in(doc: dict[str, Any]) -> Counter[str]:
    """How often each node id appears as a test (a test span or a not-run instant)."""
    return Counter(
        event["args"]["nodeid"]
        for event in doc["traceEvents"]
        if event["ph"] in ("X", "i") and event.get("cat") not in NON_TEST_CATEGORIES
    )


def missing_tests(doc: dict[str, Any], nodeids: list[str]) -> list[str]:
    """Problems with the tests: each of ``nodeids`` exactly once, and nothing else."""
    seen = nodeids_in(doc)
    found = [f"test not in the trace: {nodeid}" for nodeid in nodeids if seen[nodeid] == 0]
    found += [f"test {nodeid} in the trace {n} times" for nodeid, n in seen.items() if n > 1]
    found += [f"not a collected test: {nodeid}" for nodeid in set(seen) - set(nodeids)]
    return found


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    doc = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    found = problems(doc)
    if not found and len(argv) == 2:
        report = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
        found = missing_tests(doc, [test["nodeid"] for test in report["tests"]])
    for line in found:
        print(line, file=sys.stderr)
    if found:
        return 1
    print(f"{argv[0]}: valid trace event JSON, {len(nodeids_in(doc))} tests")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
