"""``--poolaware-trace``: the run in the Chrome trace event format (Perfetto, chrome://tracing)."""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import pairwise
from typing import Any

import pytest
from inner import ENGINE_CONFTEST, run
from tracecheck import main as check_main
from tracecheck import missing_tests, nodeids_in, problems

from pytest_poolaware.planning.core import Lane
from pytest_poolaware.reporting.runstats import ItemFacts, RunStats
from pytest_poolaware.reporting.trace_events import (
    BUDGET_COUNTER,
    NOT_RUN_TID,
    OPEN_COUNTER,
    SERVER_COUNTER,
    WAIT_CATEGORY,
    merged,
    render,
)
from pytest_poolaware.shared.markers import Markers
from pytest_poolaware.shared.server_view import ServerView

#: PG_POOL_SIZE + PG_MAX_OVERFLOW: room for one test holding two connections at a time.
POOL_ENV = {"PG_POOL_SIZE": "2", "PG_MAX_OVERFLOW": "1"}
BUDGET = 3

SUITE = """
import pytest
from conftest import hold

@pytest.mark.serial_only
class TestMigrations:
    def test_schema(self, engine):
        hold(engine, 2, 0.2)

    def test_columns(self, engine):
        hold(engine, 2, 0.2)

@pytest.mark.parallel_safe
@pytest.mark.parametrize("n", range(6))
def test_light(engine, n):
    hold(engine, 2, 0.1)

def test_no_database():
    pass
"""
TESTS = 9


def events(doc: dict[str, Any], phase: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in doc["traceEvents"]
        if e["ph"] == phase and all(e.get(k) == v for k, v in match.items())
    ]


def test_trace_of_a_real_run_holds_every_test_on_its_workers_track(
    pytester: pytest.Pytester, limited_role: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOLAWARE_DSN", limited_role(BUDGET + 2))
    for name, value in POOL_ENV.items():
        monkeypatch.setenv(name, value)
    pytester.makeconftest(ENGINE_CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    result = run(
        pytester,
        *("-n", "3", "--dist", "poolaware", "--cache-clear"),
        *("--poolaware-trace", "out/trace.json", "--poolaware-report", "report.json"),
    )
    result.assert_outcomes(passed=TESTS)
    result.stdout.fnmatch_lines([f"poolaware trace: {pytester.path / 'out' / 'trace.json'}"])
    doc = json.loads((pytester.path / "out" / "trace.json").read_text())
    report = json.loads((pytester.path / "report.json").read_text())
    assert problems(doc) == []
    assert missing_tests(doc, [test["nodeid"] for test in report["tests"]]) == []
    assert len(nodeids_in(doc)) == TESTS

    # One named track per worker, each test a span on the track of the worker that ran it.
    names = {e["tid"]: e["args"]["name"] for e in events(doc, "M", name="thread_name")}
    spans = {e["args"]["nodeid"]: e for e in events(doc, "X") if e["cat"] != WAIT_CATEGORY}
    for test in report["tests"]:
        span = spans[test["nodeid"]]
        assert names[span["tid"]].split()[0] == test["worker"]
        assert span["cat"] == test["lane"]
        assert span["args"]["outcome"] == "passed"
        assert span["dur"] == pytest.approx((test["end"] - test["start"]) * 1e6, abs=2)
        assert span["ts"] == pytest.approx((test["start"] - report["run"]["started"]) * 1e6, abs=2)
    serial = [s for s in spans.values() if s["cat"] == "serial"]
    assert sorted(s["name"] for s in serial) == [
        "test_suite.py::TestMigrations::test_columns",
        "test_suite.py::TestMigrations::test_schema",
    ]
    assert all(names[s["tid"]].endswith("(ran serial lane tests)") for s in serial)
    # Spans on one track never overlap: a worker runs one test at a time.
    by_track: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for span in spans.values():
        by_track[span["tid"]].append(span)
    for track in by_track.values():
        track.sort(key=lambda s: s["ts"])
        for before, after in pairwise(track):
            assert before["ts"] + before["dur"] <= after["ts"] + 1

    # Eight tests of two connections each within a budget of three: some waited, and each
    # wait is on its test's track, over before that test ended.
    waits = events(doc, "X", cat=WAIT_CATEGORY)
    assert waits
    for wait in waits:
        test = spans[wait["args"]["nodeid"]]
        assert wait["tid"] == test["tid"]
        assert wait["ts"] + wait["dur"] <= test["ts"] + test["dur"] + 1

    # Counters: the budget, and every worker's open connections as one series each.
    # The budget counter steps as the report's timeline says (the run's share of the
    # role's room moves at its start), and ends at the budget the tests had.
    budgets = [e["args"]["budget"] for e in events(doc, "C", name=BUDGET_COUNTER)]
    assert set(budgets) == {budget for _, budget in report["budget_timeline"]}
    assert budgets[-1] == BUDGET
    opens = events(doc, "C", name=OPEN_COUNTER)
    workers = {test["worker"] for test in report["tests"]}
    assert all(set(e["args"]) == workers for e in opens)
    assert max(sum(e["args"].values()) for e in opens) >= 2
    assert events(doc, "C", name=SERVER_COUNTER)  # monitored through $POOLAWARE_DSN


def stats_of(items: list[ItemFacts], **extra: Any) -> RunStats:
    return RunStats(
        budget=4,
        budget_source="--pool-budget",
        workers=2,
        items=tuple(items),
        peak_open=3,
        started=100.0,
        finished=110.0,
        **extra,
    )


def test_trace_of_a_run_with_a_crash_holds_the_tests_that_never_ran() -> None:
    items = [
        ItemFacts(
            "t.py::test_ran",
            Markers(False, True),
            Lane.FANOUT,
            worker="gw1",
            start=101.0,
            end=102.5,
            duration=1.5,
            need=2,
            peak_open=2,
            waited=0.25,
            outcome="passed",
            waits=((100.75, 101.0),),
        ),
        ItemFacts(
            "t.py::test_serial",
            Markers(True, False),
            Lane.SERIAL,
            worker="gw0",
            start=100.5,
            end=101.0,
            duration=0.5,
            need=1,
            peak_open=1,
            waited=0.0,
            outcome="passed",
        ),
        ItemFacts("t.py::test_crashed", Markers(False, False), Lane.FANOUT, outcome="failed"),
        ItemFacts("t.py::test_never", Markers(True, False), Lane.SERIAL, outcome="error"),
    ]
    stats = stats_of(
        items,
        timeline=((100.5, "gw0", 1), (101.0, "gw1", 2), (102.5, "gw1", 0)),
        server=ServerView(peak=3, samples=2, scope="role r", interval=0.05,
                          timeline=((100.5, 1), (101.0, 3))),
    )  # fmt: skip
    doc = json.loads(render(stats))
    assert problems(doc) == []
    assert missing_tests(doc, [item.nodeid for item in items]) == []
    (ran,) = events(doc, "X", name="t.py::test_ran")
    assert (ran["ts"], ran["dur"], ran["cat"]) == (1_000_000, 1_500_000, "fanout")
    assert ran["args"]["need"] == 2
    (wait,) = events(doc, "X", cat=WAIT_CATEGORY)
    assert (wait["tid"], wait["ts"], wait["dur"]) == (ran["tid"], 750_000, 250_000)
    not_run = events(doc, "i")
    assert {e["name"] for e in not_run} == {"t.py::test_crashed", "t.py::test_never"}
    assert {(e["tid"], e["ts"], e["s"]) for e in not_run} == {(NOT_RUN_TID, 10_000_000, "t")}
    assert {e["args"]["outcome"] for e in not_run} == {"failed", "error"}
    tracks = {e["args"]["name"] for e in events(doc, "M", name="thread_name")}
    assert tracks == {"gw0 (ran serial lane tests)", "gw1", "not run"}
    assert [e["args"] for e in events(doc, "C", name=OPEN_COUNTER)] == [
        {"gw0": 0, "gw1": 0},
        {"gw0": 1, "gw1": 0},
        {"gw0": 1, "gw1": 2},
        {"gw0": 1, "gw1": 0},
    ]
    assert [e["args"] for e in events(doc, "C", name=SERVER_COUNTER)] == [
        {"server": 1},
        {"server": 3},
    ]


def test_waits_at_once_are_one_span_on_the_track() -> None:
    """Connections opened from several threads of one test wait at the gate together."""
    waits = ((100.5, 101.0), (102.0, 103.0), (102.5, 104.0), (103.5, 103.75))
    item = ItemFacts(
        "t.py::test_threads",
        Markers(False, False),
        Lane.FANOUT,
        worker="gw0",
        start=101.0,
        end=105.0,
        duration=4.0,
        need=3,
        waits=waits,
    )
    doc = json.loads(render(stats_of([item])))
    assert problems(doc) == []
    spans = [(e["ts"], e["dur"]) for e in events(doc, "X", cat=WAIT_CATEGORY)]
    assert spans == [(500_000, 500_000), (2_000_000, 2_000_000)]
    assert merged([(3.0, 4.0), (1.0, 2.0), (2.0, 2.5)]) == [(1.0, 2.5), (3.0, 4.0)]


def test_trace_of_an_empty_run_is_still_valid() -> None:
    doc = json.loads(render(stats_of([])))
    assert problems(doc) == []
    assert nodeids_in(doc) == {}


#: The args of a test span.
T = {"nodeid": "t"}


@pytest.mark.parametrize(
    ("event", "problem"),
    [
        ({"name": "t", "ph": "X", "pid": 1, "tid": 1, "ts": 0, "args": {"nodeid": "t"}}, "dur"),
        ({"name": "t", "ph": "X", "pid": 1, "tid": "gw0", "ts": 0, "dur": 1, "args": T}, "tid"),
        ({"name": "t", "ph": "X", "pid": 1, "tid": 1, "ts": "0", "dur": 1, "args": T}, "ts"),
        ({"name": "t", "ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 1}, "nodeid"),
        ({"name": "c", "ph": "C", "pid": 1, "tid": 0, "ts": 0, "args": {"n": "1"}}, "numeric"),
        ({"name": "thread_name", "ph": "M", "pid": 1, "tid": 0, "args": {}}, "args.name"),
        ({"name": "t", "ph": "i", "pid": 1, "tid": 0, "ts": 0, "args": {"nodeid": "t"}}, "scope"),
        ({"name": "t", "ph": "B", "pid": 1, "tid": 0, "ts": 0}, "phase"),
    ],
)
def test_the_check_finds_what_breaks_the_format(event: dict[str, Any], problem: str) -> None:
    (found,) = problems({"traceEvents": [event]})
    assert problem in found


def test_the_check_finds_spans_that_do_not_nest() -> None:
    def span(name: str, ts: float, dur: float) -> dict[str, Any]:
        return {"name": name, "ph": "X", "pid": 1, "tid": 1, "ts": ts, "dur": dur, "args": T}

    nested = [span("a", 0, 10), span("b", 2, 3), span("c", 10, 5), span("d", 15, 0)]
    assert problems({"traceEvents": nested}) == []
    (found,) = problems({"traceEvents": [span("a", 0, 10), span("b", 5, 10)]})
    assert found == "pid 1 tid 1: 'b' overlaps 'a'"


def test_the_check_as_a_script(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    item = ItemFacts(
        "t.py::test_a",
        Markers(False, False),
        Lane.FANOUT,
        worker="gw0",
        start=101.0,
        end=102.0,
        duration=1.0,
        need=0,
        peak_open=0,
        waited=0.0,
    )
    trace = tmp_path / "trace.json"
    trace.write_text(render(stats_of([item])))
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"tests": [{"nodeid": "t.py::test_a"}]}))
    assert check_main([str(trace), str(report)]) == 0
    assert "valid trace event JSON, 1 tests" in capsys.readouterr().out
    report.write_text(json.dumps({"tests": [{"nodeid": "t.py::test_a"}, {"nodeid": "t.py::b"}]}))
    assert check_main([str(trace), str(report)]) == 1
    assert "test not in the trace: t.py::b" in capsys.readouterr().err
