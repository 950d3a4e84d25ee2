"""The budget the server sets, end to end: whole runs against a role's limit, directly
and behind a pooler (the reading itself: test_discovery.py; the arithmetic:
test_room.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from inner import TWO_TESTS, connection_errors, free_port, run, wait_listening
from test_scheduling import CONFTEST, SUITE

from pytest_poolaware.server.discovery import discover
from pytest_poolaware.worker.agent import RERUN_SERVER

ROLE_LIMIT = 16
#: Tests in test_scheduling.SUITE.
SUITE_TESTS = 39


# -- end to end -------------------------------------------------------------------------------


@pytest.fixture
def unconfigured_suite(
    pytester: pytest.Pytester, limited_role: Any, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The write-up's suite shape against a role limited to 16, with no PG_POOL_* set."""
    role_dsn = limited_role(ROLE_LIMIT)
    monkeypatch.setenv("POOLAWARE_DSN", role_dsn)
    monkeypatch.setenv("POOLAWARE_TEST_LOG", str(pytester.path / "events.jsonl"))
    for name in ("PG_POOL_SIZE", "PG_MAX_OVERFLOW", "PG_POOL_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    return {"dsn": role_dsn, "role": psycopg.conninfo.conninfo_to_dict(role_dsn)["user"]}


def test_with_nothing_configured_the_role_limit_is_the_budget_cold_and_warm(
    pytester: pytest.Pytester, unconfigured_suite: dict[str, str]
) -> None:
    role = unconfigured_suite["role"]
    source = f"role {role} CONNECTION LIMIT {ROLE_LIMIT}, 1 kept for the monitor"
    for first in (True, False):
        args = ["-n", "4", "--dist", "poolaware", "--poolaware-report", "report.json"]
        result = run(pytester, *args, *(["--cache-clear"] if first else []))
        result.assert_outcomes(passed=SUITE_TESTS)
        text = result.stdout.str()
        assert connection_errors(result) == 0
        # A cold run may still make a test give way to break a wait among its own
        # workers; the server itself never refuses one.
        assert RERUN_SERVER not in text
        result.stdout.fnmatch_lines([f"budget: 15 connections ({source})"])
        assert "WARNING" not in text
        report = json.loads((pytester.path / "report.json").read_text())
        assert (report["run"]["budget"], report["run"]["budget_source"]) == (15, source)
        assert not any(test["rerun"] == RERUN_SERVER for test in report["tests"])


def test_a_configured_budget_above_the_room_is_warned_about_once(
    pytester: pytest.Pytester, unconfigured_suite: dict[str, str]
) -> None:
    result = run(pytester, "-n", "2", "--dist", "poolaware", "--pool-budget", "40")
    result.assert_outcomes(passed=SUITE_TESTS)
    assert connection_errors(result) == 0
    warning = (
        "WARNING: the configured budget 40 (--pool-budget) is more than the server allows "
        f"this login (role {unconfigured_suite['role']} CONNECTION LIMIT 16, 1 kept for the "
        "monitor): the run uses 15"
    )
    assert result.stdout.lines.count(warning) == 1


# -- behind a pooler --------------------------------------------------------------------------

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@pytest.fixture
def pgbouncer(postgres_dsn: str, limited_role: Any) -> Iterator[str]:
    """pgbouncer in transaction mode in front of the server; yields a limited role's DSN
    through it."""
    if not os.path.exists(PGBOUNCER):
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    role_dsn = limited_role(ROLE_LIMIT)
    params = psycopg.conninfo.conninfo_to_dict(role_dsn)
    port = free_port()
    # Outside pytest's own temporary directory, which its unprivileged account cannot enter.
    with tempfile.TemporaryDirectory(prefix="poolaware-pgbouncer-") as directory:
        yield from _serve_pgbouncer(Path(directory), params, port)


def _serve_pgbouncer(home: Path, params: dict[str, Any], port: int) -> Iterator[str]:
    home.chmod(0o777)
    (home / "users.txt").write_text(f'"{params["user"]}" ""\n')
    (home / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"postgres = host={params['host']} port={params['port']} dbname=postgres\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {home / 'users.txt'}\npool_mode = transaction\n"
        f"logfile = {home / 'pgbouncer.log'}\n"
    )
    for path in home.iterdir():
        path.chmod(0o666)
    command = [PGBOUNCER, str(home / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command[1:1] = ["-u", "postgres"]  # it will not run as root
    errors = (home / "stderr.txt").open("w")
    process = subprocess.Popen(command, stdout=errors, stderr=errors)
    try:
        try:
            wait_listening(port, process)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{(home / 'stderr.txt').read_text()}") from None
        yield f"postgresql://{params['user']}@127.0.0.1:{port}/postgres"
    finally:
        process.terminate()
        process.wait()
        errors.close()


def test_behind_pgbouncer_the_budget_is_read_and_sharing_is_off_with_a_note(
    pytester: pytest.Pytester, pgbouncer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = discover(pgbouncer, None)
    assert found.connection is not None
    found.connection.close()
    assert found.pooled
    assert found.choice is not None
    assert found.choice.budget == ROLE_LIMIT - 1
    monkeypatch.setenv("POOLAWARE_DSN", pgbouncer)
    pytester.makepyfile(TWO_TESTS)
    result = run(pytester, "-n", "2", "--dist", "poolaware", "--poolaware-share", "auto")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "budget: 15 connections (role * CONNECTION LIMIT 16, 1 kept for the monitor)",
            "note: sharing the server's room with other runs is off: a pooler (pgbouncer) *",
        ]
    )


def inner_suite(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, dsn: str, suite: str
) -> None:
    """An inner suite against ``dsn`` with no pool sizes configured: the server's room
    is the budget."""
    monkeypatch.setenv("POOLAWARE_DSN", dsn)
    monkeypatch.setenv("POOLAWARE_TEST_LOG", os.devnull)
    for name in ("PG_POOL_SIZE", "PG_MAX_OVERFLOW"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=suite)


def test_behind_pgbouncer_a_suite_keeps_its_budget_and_says_what_is_not_counted(
    pytester: pytest.Pytester, pgbouncer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the pooler, the workers' connections are the pooler's clients: the server
    never lists their backends, so the server's list must not uncount them."""
    inner_suite(pytester, monkeypatch, pgbouncer, SUITE)
    result = run(pytester, "-n", "4", "--dist", "poolaware")
    result.assert_outcomes(passed=SUITE_TESTS)
    assert connection_errors(result) == 0
    assert RERUN_SERVER not in result.stdout.str()
    # The plugin's own queries get through the pooler all run long.
    assert "server monitoring stopped" not in result.stdout.str()
    text = result.stdout.str()
    budget = re.search(r"^budget: (\d+) connections", text, re.MULTILINE)
    peak = re.search(r"^peak open connections \(workers\): (\d+)", text, re.MULTILINE)
    assert budget, text
    assert peak, text
    # The suite asks for more than the budget at once, so the peak reaches into it, and
    # the workers' own count (the pooler's clients) stays within it.
    assert 8 <= int(peak[1]) <= int(budget[1])
    result.stdout.fnmatch_lines(
        ["note: a pooler (pgbouncer) stands between the plugin and the server: *"]
    )


TOO_BIG = """
import pytest
from conftest import hold

def test_too_big(engine):
    hold(engine, 8, 0.1)

@pytest.mark.parametrize("n", range(6))
def test_small(engine, n):
    hold(engine, 2, 0.05)
"""


def test_a_test_needing_more_than_the_server_allows_fails_with_a_clear_message(
    pytester: pytest.Pytester, limited_role: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    role_dsn = limited_role(6)
    role = psycopg.conninfo.conninfo_to_dict(role_dsn)["user"]
    inner_suite(pytester, monkeypatch, role_dsn, TOO_BIG)
    result = run(pytester, "-n", "2", "--dist", "poolaware", "-rA")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*RoomTooSmall: pytest-poolaware: this test needs 6 connections at once; the server "
            f"allows this login 6 (role {role} CONNECTION LIMIT 6), 5 of them for the run's tests"
        ]
    )
    # Not rerun for being too big: a rerun would be refused the same. (It may have given
    # way once to break a wait with a small test, before it reached the room, and then
    # run alone: that rerun is the only one allowed.)
    reruns = [line for line in result.stdout.lines if line.startswith("rerun alone")]
    for line in reruns:
        if "test_suite.py::test_too_big" in line:
            assert line.startswith("rerun alone (gave way to break a wait"), line
