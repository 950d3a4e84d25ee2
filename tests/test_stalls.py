"""No connect waits while the budget has room. A pytest-django suite against a role with
no limit once had every worker wait the whole gate timeout (30 s) at its start: while
the server was learned, the worker whose connection passed first was held behind its
own pass once that connection failed and the test connected again. These runs go
through the learning path (no DSN, no cache: every login is new to the run), the way a
pytest-django project meets it, and fail on any connect the controller judged kept
waiting with room (``gate_watch``), or any test that waited that long."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from inner import RUN_TIMEOUT
from psycopg import sql

from pytest_poolaware.gate_watch import WAIT_WITH_ROOM
from pytest_poolaware.shared.dsn import with_credentials

#: Runs through the learning path in the stress test, each a new controller.
RUNS = 20
WORKERS = 2
TESTS = 4
#: The inner runs' gate timeout: a stall that came back costs a run seconds, not 30.
GATE_TIMEOUT = 5
PASSWORD = "stall-check-3c1d"
#: An inner suite shaped as a pytest-django project's start: a session fixture per worker
#: whose first connection fails (Django falls back to another database when it cannot
#: reach ``postgres``) before it reaches the worker's own test database; each test then
#: connects to that database as the app's role (another database of a login already
#: read) and to the shared one as the admin role (another login, read while connects
#: wait).
SUITE = f"""
import os
import psycopg
import pytest

@pytest.fixture(scope="session")
def database():
    worker = os.environ["PYTEST_XDIST_WORKER"]
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(os.environ["APP_DSN"], dbname=f"missing_{{worker}}", connect_timeout=5)
    with psycopg.connect(os.environ["APP_DSN"], autocommit=True) as conn:
        conn.execute("select 1")
    return f"{{os.environ['STALL_DATABASE']}}_{{worker}}"

@pytest.mark.parametrize("n", range({TESTS}))
def test_logins(database, n):
    with psycopg.connect(os.environ["APP_DSN"], dbname=database) as conn:
        conn.execute("select 1")
    with psycopg.connect(os.environ["ADMIN_DSN"]) as conn:
        conn.execute("select 1")
"""


@pytest.fixture
def learning_project(
    pytester: pytest.Pytester, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Two roles with no limit, a database per worker owned by the app's role; no DSN,
    no pool variables, no plugin but xdist and this one (each run starts sooner)."""
    import poolaware_testserver as testserver

    tag = uuid.uuid4().hex[:10]
    app, admin, database = f"stall_app_{tag}", f"stall_admin_{tag}", f"stall_{tag}"
    app_dsn = testserver.create_role(postgres_dsn, app, password=PASSWORD)
    admin_dsn = testserver.create_role(postgres_dsn, admin, password=PASSWORD)
    names = [f"{database}_gw{n}" for n in range(WORKERS)]
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        for name in names:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(app)
                )
            )
    for name in ("POOLAWARE_DSN", "PG_POOL_SIZE", "PG_MAX_OVERFLOW", "PG_POOL_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("APP_DSN", with_credentials(app_dsn, app, PASSWORD))
    monkeypatch.setenv("ADMIN_DSN", with_credentials(admin_dsn, admin, PASSWORD))
    monkeypatch.setenv("STALL_DATABASE", database)
    pytester.makepyfile(test_logins=SUITE)
    try:
        yield
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            for name in names:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        testserver.drop_role(postgres_dsn, app)
        testserver.drop_role(postgres_dsn, admin)


def learning_run(pytester: pytest.Pytester, number: int) -> tuple[str, dict[str, Any]]:
    """One cold run (no cache: nothing remembered, every login new): its output and report."""
    report = pytester.path / f"report-{number}.json"
    result = pytester.runpytest_subprocess(
        *("-p", "xdist.plugin", "-p", "pytest_poolaware.plugin", "-p", "no:cacheprovider"),
        *("-n", str(WORKERS), "--dist", "poolaware", "-rA"),
        f"--poolaware-gate-timeout={GATE_TIMEOUT}",
        f"--poolaware-report={report}",
        timeout=RUN_TIMEOUT,
    )
    text = result.stdout.str() + result.stderr.str()
    assert result.ret == 0, text
    result.assert_outcomes(passed=TESTS)
    return text, json.loads(report.read_text())


def kept_waiting_with_room(text: str, data: dict[str, Any]) -> list[str]:
    """Every sign of a connect kept waiting while the budget had room: the controller's
    faults, a worker's gate that timed out, a test held back a second or more."""
    run = data["run"]
    signs = [f"fault: {stall}" for stall in run["stalls"]]
    signs += [line for line in text.splitlines() if "for connection budget" in line]
    signs += [
        f"{test['nodeid']} waited {test['waited']}s"
        for test in data["tests"]
        if (test["waited"] or 0.0) >= WAIT_WITH_ROOM
    ]
    return signs


@pytest.mark.e2e
def test_a_test_whose_first_connect_failed_connects_again_at_once(
    pytester: pytest.Pytester, learning_project: None
) -> None:
    """The first connection of the run fails: its test's next connect, and every other
    worker's, goes through at once; the server is still learned, and so are the logins."""
    text, data = learning_run(pytester, 0)
    assert kept_waiting_with_room(text, data) == [], text
    assert "note: the server and login were learned from the first connection" in text
    assert "tests also connected as stall_admin_" in text  # the other role, read
    assert f"tests also used {WORKERS} other databases as stall_app_" in text


@pytest.mark.e2e
def test_runs_through_the_learning_path_never_keep_a_connect_waiting_with_room(
    pytester: pytest.Pytester, learning_project: None
) -> None:
    """RUNS cold runs, each learning the server and its logins from the workers' first
    connections while they start: not one connect kept waiting with room."""
    found: dict[int, list[str]] = {}
    for number in range(RUNS):
        text, data = learning_run(pytester, number)
        signs = kept_waiting_with_room(text, data)
        if signs:
            found[number] = signs
    assert found == {}
