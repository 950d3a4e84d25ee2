"""End to end, one suite per route to the server that is not SQLAlchemy: raw psycopg, a
module-scoped psycopg_pool, per-test asyncpg pools, bare asyncpg connects, serial tests
holding six asyncpg connections, and asyncio.gather of more connects than the budget.
Real xdist workers against a role with a connection limit."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from inner import ROLE_LIMIT, connection_errors, run, serve_limited_role
from test_scheduling import ServerSampler

from pytest_poolaware.server.connection import APPLICATION_NAME as MONITOR_APPLICATION_NAME

#: The raw-driver suite the benchmarks run too: one copy of it.
RAW_SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "rawdrivers"
CONFTEST = (RAW_SUITE / "conftest.py").read_text()
SUITE = (RAW_SUITE / "test_routes.py").read_text()

GATHER_SUITE = """
import asyncio
import pytest
from conftest import hold_asyncpg

@pytest.mark.parametrize("n", range(6))
def test_gather(n):
    asyncio.run(hold_asyncpg(8, 0.2, gather=True))
"""

PASSED = 3 + 4 * 12


@pytest.fixture
def routes(
    pytester: pytest.Pytester,
    limited_role: Any,
    role_limit: int,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:
    role_dsn, role = serve_limited_role(limited_role, role_limit, monkeypatch)
    # The inner runs' rootdir, whatever configuration files lie above the test directory.
    pytester.makeini("[pytest]\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_routes=SUITE)
    return {"dsn": role_dsn, "role": role}


def test_load_exhausts_connections_where_poolaware_does_not(
    pytester: pytest.Pytester, routes: dict[str, Any], postgres_dsn: str
) -> None:
    # Stopped early: a pool that cannot connect makes each of its tests wait for it.
    load = run(pytester, "-n", "4", "--dist", "load", "--maxfail=10")
    assert load.ret in (pytest.ExitCode.TESTS_FAILED, pytest.ExitCode.INTERRUPTED)
    assert connection_errors(load) > 0

    report = pytester.path / "report.json"
    for warm in (False, True):
        with ServerSampler(postgres_dsn, routes["role"]) as sampler:
            result = run(
                pytester,
                "-n",
                "4",
                "--dist",
                "poolaware",
                f"--poolaware-report={report}",
                *(() if warm else ("--cache-clear",)),
            )
        result.assert_outcomes(passed=PASSED)
        out = result.stdout.str()
        assert connection_errors(result) == 0
        assert "rerun" not in out
        assert "waited" not in out  # no gate timed out
        assert 0 < sampler.peak <= 15
        data = json.loads(report.read_text())
        assert 0 < data["run"]["peak_open_workers"] <= 15
        needs = {t["nodeid"].split("[")[0]: t["need"] for t in data["tests"]}
        assert needs["test_routes.py::test_serial_six_asyncpg"] == 6
        drivers = {t["nodeid"].split("[")[0]: tuple(t["drivers"]) for t in data["tests"]}
        assert drivers["test_routes.py::test_raw_psycopg"] == ("psycopg",)
        assert drivers["test_routes.py::test_bare_asyncpg"] == ("asyncpg",)
        assert not any(
            a["marker"] == "parallel_safe" and "six_asyncpg" in a["target"] for a in data["advice"]
        )


@pytest.mark.parametrize("role_limit", [32])
def test_gather_beyond_the_budget_finishes_without_a_gate_timeout(
    pytester: pytest.Pytester, routes: dict[str, Any]
) -> None:
    # Each test awaits 8 connects at once on one event loop; the budget has room for 5.
    # The gate must answer them by awaiting (a blocking wait would freeze the loop that
    # holds the connections) and break the wait by making tests give way.
    pytester.makepyfile(test_routes=GATHER_SUITE)
    result = run(pytester, "-n", "4", "--dist", "poolaware", "--pool-budget", "5")
    result.assert_outcomes(passed=6)
    out = result.stdout.str()
    assert "waited" not in out
    assert "the server refused a connection" not in out
    # One warning for them all (or the one test's own words), with what they needed.
    assert re.search(
        r"needed (8 connections, more|more connections at once) than the whole budget of 5", out
    ), out


#: The subprocess holds its connection until the monitor has begun this many samples
#: after it connected (bounded by HOLD_SECONDS): the summary's "server minus workers" is
#: taken per sample, and one sample could meet a worker's count a moment ahead of the
#: server's and hide the connection. Only the samples count (``SAMPLE_QUERY``): the
#: plugin's connection also runs the sharing's queries, several per step.
SAMPLE_QUERY = "SELECT pid FROM pg_stat_activity"
HOLD_SAMPLES = 10
HOLD_SECONDS = 20
HOLD = f"""
import os, time, psycopg
conn = psycopg.connect(os.environ["POOLAWARE_DSN"], autocommit=True)
seen, deadline = set(), time.monotonic() + {HOLD_SECONDS}
while len(seen) < {HOLD_SAMPLES} and time.monotonic() < deadline:
    row = conn.execute(
        "SELECT query_start FROM pg_stat_activity WHERE application_name = %s "
        "AND starts_with(query, %s) "
        "AND query_start > (SELECT backend_start FROM pg_stat_activity "
        "WHERE pid = pg_backend_pid())",
        ({MONITOR_APPLICATION_NAME!r}, {SAMPLE_QUERY!r}),
    ).fetchone()
    if row:
        seen.add(row[0])
    time.sleep(0.01)
"""
BLIND_SPOT = f"""
import subprocess, sys

def test_subprocess_holds_a_connection():
    subprocess.run([sys.executable, "-c", {HOLD!r}], check=True)
"""


@pytest.mark.parametrize("role_limit", [ROLE_LIMIT + 1])
def test_monitored_run_counts_agree_with_the_server(
    pytester: pytest.Pytester, routes: dict[str, Any]
) -> None:
    # One slot more than the budget's own: room for the monitor's connection, so the
    # server's count of the role is compared with the workers'.
    report = pytester.path / "report.json"
    result = run(pytester, "-n", "4", "--dist", "poolaware", f"--poolaware-report={report}")
    result.assert_outcomes(passed=PASSED)
    run_data = json.loads(report.read_text())["run"]
    assert 0 < run_data["peak_open_server"] <= 15
    # Every route's connections counted until the server let them go: none left over.
    assert run_data["uncounted"]["end_workers"] == run_data["uncounted"]["end_server"] == 0

    # A connection no worker can see (a subprocess's) is shown, not hidden. In a run of
    # its own: the two views are compared by count, and the other tests' opens and
    # closes in flight between them would, on a busy machine, cover it up at times.
    pytester.makepyfile(test_routes=BLIND_SPOT)
    result = run(pytester, "-n", "4", "--dist", "poolaware", f"--poolaware-report={report}")
    result.assert_outcomes(passed=1)
    run_data = json.loads(report.read_text())["run"]
    assert run_data["uncounted"]["most"] == 1
    assert run_data["uncounted"]["end_workers"] == run_data["uncounted"]["end_server"] == 0
    assert "not counted by the workers (server minus workers): up to 1 at once" in (
        result.stdout.str()
    )


LEAKY = """
import os
import psycopg

KEPT = []

def test_keeps_a_connection():
    KEPT.append(psycopg.connect(os.environ["POOLAWARE_DSN"]))

def test_closes_its_connection():
    with psycopg.connect(os.environ["POOLAWARE_DSN"]) as conn:
        conn.execute("select 1")
"""


def test_a_test_ending_with_its_connection_open_is_listed(
    pytester: pytest.Pytester, routes: dict[str, Any]
) -> None:
    pytester.makepyfile(test_routes=LEAKY)
    result = run(pytester, "-n", "2", "--dist", "poolaware")
    result.assert_outcomes(passed=2)
    lines = result.stdout.lines
    at = lines.index("connections still held at a test's end (opened or checked out by it):")
    assert lines[at + 1].split() == ["1", "test_routes.py::test_keeps_a_connection"]
    assert "test_closes_its_connection" not in "\n".join(lines[at + 1 :])


TERMINATED = """
import os, time
import psycopg
import pytest

DSN = os.environ["POOLAWARE_DSN"]
KEPT = []

def test_holds_one_for_a_while():
    with psycopg.connect(DSN) as conn:
        conn.execute("select pg_sleep(4)")

@pytest.mark.serial_only
def test_keeps_a_connection():
    KEPT.append(psycopg.connect(DSN))

@pytest.mark.serial_only
def test_the_server_ends_it():
    pid = KEPT[0].info.backend_pid
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute("select pg_terminate_backend(%s)", [pid])
        deadline = time.monotonic() + 10
        while conn.execute(
            "select count(*) from pg_stat_activity where pid = %s", [pid]
        ).fetchone()[0]:
            assert time.monotonic() < deadline

@pytest.mark.serial_only
def test_needs_two_more():
    with psycopg.connect(DSN) as a, psycopg.connect(DSN) as b:
        a.execute("select 1")
        b.execute("select 1")
"""


@pytest.mark.parametrize("role_limit", [ROLE_LIMIT + 1])
def test_a_connection_the_server_ended_is_uncounted_when_a_wait_begins(
    pytester: pytest.Pytester, routes: dict[str, Any]
) -> None:
    # Budget 3: the serial lane's worker counts the ended connection (its driver has not
    # noticed) and opens two more beside the other worker's one, so it has to wait; the
    # server's backend pids, sent when the wait begins, uncount the ended one.
    pytester.makepyfile(test_routes=TERMINATED)
    report = pytester.path / "report.json"
    result = run(
        pytester, "-n", "2", "--dist", "poolaware", "--pool-budget", "3",
        f"--poolaware-report={report}",
    )  # fmt: skip
    result.assert_outcomes(passed=4)
    assert json.loads(report.read_text())["run"]["uncounted"]["end_workers"] == 0
