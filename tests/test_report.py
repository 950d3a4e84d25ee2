"""What a user sees after a ``--dist poolaware`` run: summary, JSON report, timeline, advice."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import psycopg
import pytest
from inner import ENGINE_CONFTEST, TWO_TESTS, run, serve_limited_role
from pixels import area_pixels, pixel_counts, png, rgb

from pytest_poolaware.planning.core import Lane, Overrun
from pytest_poolaware.planning.lowerbound import lower_bound
from pytest_poolaware.reporting import report
from pytest_poolaware.reporting.runstats import JSON_DIGITS, ItemResult, RunSnapshot
from pytest_poolaware.reporting.timeline import BUDGET_COLOUR
from pytest_poolaware.server.connection import libpq_dsn
from pytest_poolaware.server.monitor import ServerMonitor
from pytest_poolaware.server.room import CLOSING_SLACK
from pytest_poolaware.shared.markers import Markers
from pytest_poolaware.shared.protocol import ItemMeasures
from pytest_poolaware.shared.settings import Settings, monitor_dsn
from pytest_poolaware.worker.agent import RERUN_DEADLOCK, RERUN_SERVER

#: Pool sizing as in the write-up: the budget is their sum, 15; advice from 8 connections.
BUDGET = 15
#: Room for the budget and the monitor.
ROLE_LIMIT = BUDGET + 1
#: How far two figures of the report, rounded on their own, may sum past a third that
#: bounds them: half a unit of the last digit kept for each of the three.
ROUNDED = 1.5 * 10.0**-JSON_DIGITS + 1e-12
#: Tests in SUITE, per lane.
SERIAL_TESTS = 3
FANOUT_TESTS = 13

CONFTEST = ENGINE_CONFTEST

SUITE = """
import pytest
from conftest import hold

@pytest.mark.serial_only
class TestMigrations:
    def test_schema(self, engine):
        hold(engine, 3, 0.2)

    def test_columns(self, engine):
        hold(engine, 3, 0.2)

@pytest.mark.serial_only
def test_wireguard_config():
    # Marked serial_only by habit; it never touches the database.
    assert "wg0".startswith("wg")

@pytest.mark.parallel_safe
@pytest.mark.parametrize("n", range(8))
def test_light(engine, n):
    hold(engine, 1, 0.05)

def test_unmarked_heavy(engine):
    hold(engine, 9, 0.3)

@pytest.mark.parametrize("n", range(4))
def test_unmarked_light(engine, n):
    hold(engine, 2, 0.05)
"""

NO_DB = TWO_TESTS


def poolaware(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return run(pytester, "-n", "4", "--dist", "poolaware", *args)


SECTION = re.compile(r"-+ poolaware -+")
#: pytest's closing line: "==== 16 passed in 1.2s ====", or with -q "16 passed in 1.2s".
CLOSING = re.compile(r"(=+ )?\d+ \w+.* in [\d.]+s( \(.*\))?( =+)?")


def section(result: pytest.RunResult) -> list[str]:
    """The lines of the poolaware summary section."""
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if SECTION.fullmatch(line))
    end = next(i for i in range(start + 1, len(lines)) if CLOSING.fullmatch(lines[i]))
    return lines[start + 1 : end]


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match is not None, (pattern, text)
    return float(match.group(1))


@pytest.fixture
def suite(
    pytester: pytest.Pytester, limited_role: Any, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """SUITE against a role limited to the budget plus the monitor's connection."""
    role_dsn, role = serve_limited_role(limited_role, ROLE_LIMIT, monkeypatch)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    return {"dsn": role_dsn, "role": role}


# -- end to end ---------------------------------------------------------------------------


def test_summary_shows_budget_peaks_lanes_needs_wall_and_advice(
    pytester: pytest.Pytester, suite: dict[str, str]
) -> None:
    result = poolaware(pytester, "--cache-clear", "--poolaware-advice", "advice.txt")
    result.assert_outcomes(passed=SERIAL_TESTS + FANOUT_TESTS)
    lines = section(result)
    text = "\n".join(lines)
    assert lines[0] == f"budget: {BUDGET} connections (PG_POOL_SIZE + PG_MAX_OVERFLOW = 5 + 10)"
    workers = number(r"^peak open connections \(workers\): (\d+)$", lines[1])
    assert 9 <= workers <= BUDGET
    server = number(
        rf"^peak open connections \(server\): (\d+) \(role {suite['role']}, \d+ samples", lines[2]
    )
    assert 9 <= server <= BUDGET
    serial = number(rf"serial lane: {SERIAL_TESTS} tests, running (\d+\.\d+)s, held back", text)
    assert serial >= 0.4  # two tests of 0.2 s each
    assert number(rf"fan-out: {FANOUT_TESTS} tests, running (\d+\.\d+)s, held back", text) > 0.3
    top = lines.index("most connections at once:")
    assert re.fullmatch(
        r"\s+9\s+fanout\s+test_suite.py::test_unmarked_heavy  \(psycopg\)", lines[top + 1]
    )
    assert re.fullmatch(
        r"\s+3\s+serial\s+test_suite.py::TestMigrations::test_\w+  \(psycopg\)", lines[top + 2]
    )
    wall = number(r"wall: (\d+\.\d+)s from the first test's start", text)
    bound = number(r"lower bound (\d+\.\d+)s \(", text)
    assert 0 < bound <= wall * 1.5
    assert number(r"wall/LB (\d+\.\d+)", text) == pytest.approx(wall / bound, abs=0.02)
    assert (
        "  serial_only candidate: test_suite.py::test_unmarked_heavy: "
        "unmarked, held 9 connections at once (advice from 8)"
    ) in lines
    assert (
        "  parallel_safe candidate: test_suite.py::test_wireguard_config: "
        "serial_only, held no connections"
    ) in lines
    # Below the threshold, or marked: no advice.
    assert "test_unmarked_light" not in text.split("marker advice")[1]
    assert "TestMigrations" not in text.split("marker advice")[1]
    assert f"poolaware advice: {pytester.path / 'advice.txt'}" in lines
    # The advice file: file:line of each definition, and the marker to put there.
    advice = (pytester.path / "advice.txt").read_text().splitlines()
    source = (pytester.path / "test_suite.py").read_text().splitlines()
    entries = [entry for entry in advice if not entry.startswith("#")]
    assert len(entries) == 2
    heavy, wireguard = entries
    where, _, what = heavy.partition(": ")
    assert what.startswith("@pytest.mark.serial_only  # test_unmarked_heavy: unmarked, held 9")
    path, lineno = where.split(":")
    assert path == "test_suite.py"
    assert source[int(lineno) - 1] == "def test_unmarked_heavy(engine):"
    where, _, what = wireguard.partition(": ")
    assert what.startswith("@pytest.mark.parallel_safe (instead of serial_only)")
    assert source[int(where.split(":")[1]) - 1] == "def test_wireguard_config():"


def test_json_report_has_every_test_and_the_run(
    pytester: pytest.Pytester, suite: dict[str, str]
) -> None:
    result = poolaware(pytester, "--cache-clear", "--poolaware-report", "out/report.json", "-q")
    result.assert_outcomes(passed=SERIAL_TESTS + FANOUT_TESTS)
    data = json.loads((pytester.path / "out" / "report.json").read_text())
    assert data["schema_version"] == 1
    run_ = data["run"]
    assert (run_["workers"], run_["budget"]) == (4, BUDGET)
    assert run_["budget_source"] == "PG_POOL_SIZE + PG_MAX_OVERFLOW = 5 + 10"
    assert 9 <= run_["peak_open_workers"] <= BUDGET
    assert 9 <= run_["peak_open_server"] <= BUDGET
    assert run_["server_scope"] == f"role {suite['role']}"
    # cold: nothing learned to place tests by
    assert (run_["order"], run_["placement"], run_["learned"]) == ("collection", "ranges", 0)
    tests = {t["nodeid"]: t for t in data["tests"]}
    collected = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:randomly")
    nodeids = [line for line in collected.stdout.lines if "::" in line]
    assert sorted(tests) == sorted(nodeids)
    assert len(tests) == SERIAL_TESTS + FANOUT_TESTS
    for nodeid, test in tests.items():
        serial = "TestMigrations" in nodeid or "wireguard" in nodeid
        assert test["lane"] == ("serial" if serial else "fanout"), nodeid
        assert test["markers"] == (
            ["serial_only"] if serial else ["parallel_safe"] if "::test_light[" in nodeid else []
        )
        assert re.fullmatch(r"gw[0-3]", test["worker"])
        assert run_["started"] <= test["start"] <= test["end"] <= run_["finished"]
        assert 0 <= test["duration"] <= test["end"] - test["start"] + 1e-3
        assert test["waited"] >= 0
        # Of the time held back: for its go, and at the gate inside its duration. Each
        # figure is rounded on its own, so a sum may pass the rounded total by 1.5 units
        # of the last digit kept.
        assert 0 <= test["go_wait"] + test["gate_wait"] <= test["waited"] + ROUNDED
        assert test["gate_wait"] <= test["duration"] + ROUNDED
        assert test["peak_open"] >= test["need"]
        assert test["outcome"] == "passed"
        assert test["rerun"] in (None, RERUN_DEADLOCK, RERUN_SERVER)
    assert tests["test_suite.py::test_unmarked_heavy"]["need"] == 9
    assert tests["test_suite.py::test_wireguard_config"]["need"] == 0
    assert tests["test_suite.py::test_light[0]"]["need"] == 1
    assert {tests[n]["worker"] for n in tests if tests[n]["lane"] == "serial"} != set()
    # The lower bound, recomputed from the per-test data (docs/design.md, "Lower bound"):
    # durations net of the time at the connect gate; B the largest budget in force, here
    # the run's share of the role's room, which keeps a slot for other runs' closes.
    b = run_["lower_bound"]["budget"]
    assert BUDGET - CLOSING_SLACK <= b <= BUDGET

    def net(test: dict[str, Any]) -> float:
        return float(test["duration"] - test["gate_wait"])

    serial_tests = [t for t in tests.values() if t["lane"] == "serial"]
    serial_sum = sum(map(net, serial_tests))
    fanout_tests = [t for t in tests.values() if t["lane"] == "fanout"]
    lightest = min(min(t["need"], b) for t in serial_tests)
    conflicting = [t for t in fanout_tests if min(t["need"], b) + lightest > b]
    expected = max(
        serial_sum,
        max(map(net, tests.values())),
        sum(map(net, tests.values())) / 4,
        sum(net(t) * min(t["need"], b) for t in tests.values()) / b,
        serial_sum + sum(net(t) * min(t["need"], b) for t in conflicting) / b,
    )
    assert run_["lower_bound"]["value"] == pytest.approx(expected, abs=1e-4)
    fanout = [t["duration"] for t in fanout_tests]
    assert run_["wall_over_lb"] == pytest.approx(run_["wall"] / expected, rel=1e-3)
    assert run_["lanes"]["serial"]["items"] == SERIAL_TESTS
    assert run_["lanes"]["fanout"]["running"] == pytest.approx(sum(fanout), abs=1e-4)
    assert [a["target"] for a in data["advice"]] == [
        "test_suite.py::test_unmarked_heavy",
        "test_suite.py::test_wireguard_config",
    ]
    assert data["timeline"]
    assert data["server_timeline"]
    # -q: one line, with the same figures (and a line per rerun, if any).
    line, *others = section(result)
    assert all(other.startswith("rerun alone (") for other in others)
    assert line.startswith(
        f"poolaware: budget {BUDGET}, peak {run_['peak_open_workers']} open "
        f"(server {run_['peak_open_server']}), wall "
    )
    assert line.endswith("2 marker advice (see the summary without -q)")


def test_timeline_svg_renders_with_the_budget_line(
    pytester: pytest.Pytester, suite: dict[str, str]
) -> None:
    result = poolaware(pytester, "--poolaware-timeline", "timeline.svg", "-v")
    result.assert_outcomes(passed=SERIAL_TESTS + FANOUT_TESTS)
    result.stdout.fnmatch_lines([f"poolaware timeline: {pytester.path / 'timeline.svg'}"])
    # -v: one line per worker too (what of the wait was for a go, and at the gate).
    workers = [line for line in result.stdout.lines if line.startswith("  worker gw")]
    assert workers
    for line in workers:
        assert re.fullmatch(
            r"  worker gw\d: \d+ tests, running \d+\.\d\ds, held back by the budget "
            r"\d+\.\d\ds( \(for a go \d+\.\d\ds, at the connect gate \d+\.\d\ds\))?",
            line,
        ), line
    svg = (pytester.path / "timeline.svg").read_text()
    ET.fromstring(svg)  # well-formed
    assert "serial_only: test_suite.py::TestMigrations::test_schema" in svg
    image = png(svg)
    colours = pixel_counts(image)
    assert colours[rgb(BUDGET_COLOUR)] >= 400  # a line across the plot
    assert area_pixels(image) > 3000  # the stacked areas, shaded or not: not blank


def test_a_budget_that_leaves_no_slot_for_the_monitor_is_lowered_with_a_warning(
    pytester: pytest.Pytester, limited_role: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    role_dsn = limited_role(3)
    monkeypatch.setenv("POOLAWARE_DSN", role_dsn)
    pytester.makepyfile(NO_DB)
    result = run(pytester, "-n", "2", "--dist", "poolaware", "--pool-budget", "3")
    result.assert_outcomes(passed=2)
    role = psycopg.conninfo.conninfo_to_dict(role_dsn)["user"]
    source = f"role {role} CONNECTION LIMIT 3, 1 kept for the monitor"
    result.stdout.fnmatch_lines(
        [
            f"budget: 2 connections ({source}; configured 3)",
            f"peak open connections (server): 0 (role {role}, * samples every 0.05s)",
            "WARNING: the configured budget 3 (--pool-budget) is more than the server allows "
            f"this login ({source}): the run uses 2",
        ]
    )


def test_server_monitoring_failure_is_a_note_without_the_password(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(NO_DB)
    dsn = "postgresql://nobody:s3cret@127.0.0.1:1/nowhere"
    result = run(pytester, "-n", "2", "--dist", "poolaware", "--poolaware-monitor", dsn)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "note: server monitoring off: cannot use postgresql://nobody:***@127.0.0.1:1/nowhere: "
            "* (DSN from --poolaware-monitor; --poolaware-monitor=off turns monitoring off); "
            "the budget was not checked against the server"
        ]
    )
    assert "s3cret" not in result.stdout.str() + result.stderr.str()


def test_monitoring_off_and_very_quiet(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(NO_DB)
    result = run(pytester, "-n", "2", "--dist", "poolaware", "--poolaware-monitor", "off", "-qq")
    assert result.ret == pytest.ExitCode.OK
    assert not any(SECTION.fullmatch(line) for line in result.stdout.lines)


@pytest.mark.parametrize(
    ("args", "ini", "message"),
    [
        (["--poolaware-risky-need", "0"], "", "*--poolaware-risky-need*positive integer*'0'*"),
        (["--poolaware-idle-need", "x"], "", "*--poolaware-idle-need*'x'*"),
        (["--poolaware-monitor", "user:pw@db"], "", "*--poolaware-monitor*DSN or 'off'*'***'*"),
        ([], "poolaware_risky_need = lots", "*poolaware_risky_need='lots'*positive integer*"),
        ([], "poolaware_monitor = me:pw@db", "*poolaware_monitor: *DSN or 'off'*'***'*"),
    ],
)
def test_bad_report_settings_are_usage_errors(
    pytester: pytest.Pytester, args: list[str], ini: str, message: str
) -> None:
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(NO_DB)
    result = run(pytester, "-n", "2", "--dist", "poolaware", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "pw@" not in result.stderr.str()


# -- pure pieces ------------------------------------------------------------------------


def load_benchmarks() -> Any:
    """``benchmarks/run.py`` as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    spec = importlib.util.spec_from_file_location("poolaware_benchmarks", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being made
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_benchmarks_measure_against_the_summary_s_lower_bound(workers: int) -> None:
    bench = load_benchmarks()
    cases = [
        bench.TestCase(duration=3.0, outcome="passed", conn_error=False, peak=8, serial=True),
        bench.TestCase(duration=2.0, outcome="passed", conn_error=False, peak=40, serial=False),
        bench.TestCase(duration=1.0, outcome="passed", conn_error=False, peak=None, serial=False),
    ]
    reported = bench.demo_lower_bound(cases, workers, 15)
    bound = lower_bound(workers, 15, [(3.0, 8)], [(2.0, 40), (1.0, 0)])
    assert (reported["value"], reported["binding"]) == (bound.value, bound.binding)
    assert reported["peak_by_lane"] == {"serial_only": 8, "other": 40}
    # The 40-connection test holds the budget (15), not 40, for its 2 s: 3.6 s, not 6.9 s.
    assert bound.connections == pytest.approx((3.0 * 8 + 2.0 * 15) / 15)
    # Beside the 8-connection serial test it would be over the budget: it runs in a gap
    # of the lane, 3 s + 2 s. One worker runs everything one after another: 6 s.
    assert bound.conflicts == pytest.approx(5.0)
    assert bound.value == pytest.approx(6.0 if workers == 1 else 5.0)


def test_the_report_is_made_of_the_scheduler_s_snapshot() -> None:
    """The last attempt of an item counts; an item that never ran is listed with its
    planned lane; an overrun names its test; the scheduler's notes come first."""
    measures = ItemMeasures(
        need=20, peak_open=21, duration=2.0, waited=0.5, start=10.0, end=12.0,
        rerun="", open=0, idle=0, version=3, go_waited=0.1, gate_waited=0.4,
    )  # fmt: skip
    first = dataclasses.replace(measures, need=1, duration=9.0)
    snapshot = RunSnapshot(
        workers=2,
        collection=("t.py::test_serial", "t.py::test_heavy", "t.py::test_never"),
        markers=(Markers(serial=True), Markers(), Markers(parallel=True)),
        lanes=(Lane.SERIAL, Lane.FANOUT, Lane.FANOUT),
        results=(
            ItemResult("t.py::test_heavy", Lane.FANOUT, "gw1", first),
            ItemResult("t.py::test_heavy", Lane.FANOUT, "gw1", measures),
        ),
        overruns=(Overrun(index=1, need=20, budget=15, alone=True),),
        peak_open=21,
        timeline=((10.0, "gw1", 21),),
        notes=("[gw1] waited 30s for connection budget; connecting anyway",),
        largest_budget=20,  # another run gave its share back for a while
    )
    settings = Settings(budget=15, budget_source="--pool-budget")
    stats = report.collect(
        settings=settings,
        snapshot=snapshot,
        started=9.0,
        finished=13.0,
        outcomes={"t.py::test_heavy": "passed"},
        notes=["server monitoring off"],
    )
    serial, heavy, never = stats.items
    assert (serial.lane, serial.markers, serial.need) == (Lane.SERIAL, Markers(serial=True), None)
    assert (heavy.worker, heavy.need, heavy.duration, heavy.outcome) == ("gw1", 20, 2.0, "passed")
    assert (never.lane, never.markers.names, never.outcome) == (
        Lane.FANOUT,
        ["parallel_safe"],
        None,
    )
    assert [stats.nodeid_of(o) for o in stats.overruns] == ["t.py::test_heavy"]
    assert stats.notes == (*snapshot.notes, "server monitoring off")
    assert (stats.workers, stats.peak_open, stats.timeline) == (2, 21, snapshot.timeline)
    assert [c.target for c in stats.advice] == ["t.py::test_heavy"]  # 20 >= half of 15
    data = stats.to_json()
    assert data["run"]["overruns"] == [
        {
            "nodeid": "t.py::test_heavy",
            "need": 20,
            "budget": 15,
            "alone": True,
            "outside": [],
            "in_tests": 0,
            "cause": "too_big",
            "why": "it needed 20 connections at once, more than the whole budget of 15",
        }
    ]
    assert [t["markers"] for t in data["tests"]] == [["serial_only"], [], ["parallel_safe"]]
    assert (data["tests"][1]["go_wait"], data["tests"][1]["gate_wait"]) == (0.1, 0.4)
    # The bound counts test_heavy's 2 s without its 0.4 s at the gate, and B is the
    # largest budget in force (20), not the one the run ended with.
    bound = data["run"]["lower_bound"]
    assert (bound["value"], bound["binding"], bound["budget"]) == (1.6, "longest test", 20)


# -- settings and the monitor --------------------------------------------------------------


def test_monitor_dsn_values() -> None:
    assert monitor_dsn(" off ") == ""
    assert monitor_dsn("postgresql+psycopg://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert monitor_dsn("host=h dbname=d") == "host=h dbname=d"
    with pytest.raises(Exception, match=r"DSN or 'off', got '\*\*\*'"):
        monitor_dsn("u:secret@h")
    assert libpq_dsn("postgresql+asyncpg://u@h/db") == "postgresql://u@h/db"


def test_monitor_counts_tagged_connections_with_a_superuser(postgres_dsn: str) -> None:
    monitor = ServerMonitor(postgres_dsn, budget=5)
    monitor.start()
    assert monitor.problem is None
    with (
        psycopg.connect(postgres_dsn, application_name="poolaware-gw7"),
        psycopg.connect(postgres_dsn, application_name="someone-else"),
    ):
        view = monitor.stop()  # its last sample is taken here, with both open
    assert view is not None
    assert view.scope == "application_name poolaware-*"
    # The first sample was taken by start(); since then only the tagged one counts,
    # neither the untagged one nor the monitor's own.
    assert view.timeline[-1][1] - view.timeline[0][1] == 1
    assert view.peak >= 1
    assert view.samples == len(view.timeline) >= 2


def test_monitor_counts_every_connection_of_a_limited_role(limited_role: Any) -> None:
    role_dsn = limited_role(5)
    role = psycopg.conninfo.conninfo_to_dict(role_dsn)["user"]
    monitor = ServerMonitor(role_dsn, budget=3)
    monitor.start()
    with psycopg.connect(role_dsn), psycopg.connect(role_dsn):
        view = monitor.stop()
    assert view is not None
    assert (view.scope, view.timeline[0][1], view.timeline[-1][1]) == (f"role {role}", 0, 2)
