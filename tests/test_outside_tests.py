"""Connections opened outside any test: at conftest import, in ``pytest_configure``,
``pytest_sessionstart``, collection, ``pytest_sessionfinish`` and ``pytest_unconfigure``.

Real suites connect there (SQLAlchemy's own suite provisions each worker's database in
``pytest_sessionstart``); each place must be admitted at once, counted in the budget, and
named in the summary, whatever the driver, with or without a DSN given to the plugin.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from inner import ROLE_LIMIT, connection_errors, run

#: An inner conftest connecting, on workers only, wherever ``SUITE_PLACES`` says, with the
#: driver ``SUITE_DRIVER``, and logging how long each connect took.
CONFTEST = """
import asyncio, importlib, json, os, time

DSN = os.environ["SUITE_DSN"]
DRIVER = os.environ["SUITE_DRIVER"]
PLACES = set(os.environ["SUITE_PLACES"].split(","))
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
held = []


def open_checked():
    '''Open one connection, run a query; return what closes it.'''
    if DRIVER == "psycopg":
        import psycopg
        conn = psycopg.connect(DSN)
        conn.execute("select 1")
        return conn.close
    if DRIVER == "psycopg2":
        import psycopg2
        conn = psycopg2.connect(DSN)
        conn.cursor().execute("select 1")
        return conn.close
    if DRIVER == "asyncpg":
        import asyncpg
        async def once():
            conn = await asyncpg.connect(DSN)
            await conn.execute("select 1")
            await conn.close()
        asyncio.run(once())
        return lambda: None
    if DRIVER == "sqlalchemy":
        from sqlalchemy import create_engine, text
        engine = create_engine(DSN.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        return engine.dispose
    if DRIVER == "sqlalchemy-asyncio":
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine
        async def once():
            engine = create_async_engine(DSN.replace("postgresql://", "postgresql+asyncpg://", 1))
            async with engine.connect() as conn:
                await conn.execute(text("select 1"))
            await engine.dispose()
        asyncio.run(once())
        return lambda: None
    raise ValueError(DRIVER)


MODULES = {
    "psycopg": ["psycopg"],
    "psycopg2": ["psycopg2"],
    "asyncpg": ["asyncpg"],
    "sqlalchemy": ["sqlalchemy", "psycopg"],
    "sqlalchemy-asyncio": ["sqlalchemy.ext.asyncio", "asyncpg"],
}


def connect(place, keep=False):
    if WORKER is None or place not in PLACES:
        return
    for module in MODULES[DRIVER]:  # the import is the suite's own time, not a wait
        importlib.import_module(module)
    begun = time.monotonic()
    close = open_checked()
    seconds = time.monotonic() - begun
    with open(os.environ["SUITE_LOG"], "a") as log:
        log.write(json.dumps({"place": place, "worker": WORKER, "seconds": seconds}) + "\\n")
    if keep:
        held.append(close)
    else:
        close()


connect("import")


def pytest_configure(config):
    connect("configure")


def pytest_sessionstart(session):
    connect("sessionstart", keep=True)


def pytest_sessionfinish(session):
    while held:
        held.pop()()
    connect("sessionfinish")


def pytest_unconfigure(config):
    connect("unconfigure")
"""

TESTS = """
import os
import psycopg
import pytest
from conftest import connect

connect("collection")


@pytest.mark.parametrize("i", range(12))
def test_query(i):
    with psycopg.connect(os.environ["SUITE_DSN"]) as conn:
        conn.execute("select 1")
"""

#: What the summary calls each place (``pytest_unconfigure`` comes after the summary).
SUMMARY_NAME = {
    "import": "start-up",
    "configure": "start-up",
    "sessionstart": "session start",
    "collection": "collection",
    "sessionfinish": "session finish",
}
#: A connect outside a test that takes longer than this (connecting included, on a busy
#: machine) waited for something that could not come: the controller used to answer no
#: worker before it joined, so each waited for the gate's timeout (30 s), then crashed.
PROMPT = 5.0
#: The summary names the longest wait for room outside tests from this long on
#: (``dispatch.OUTSIDE_WAIT_WORTH_SAYING``): none may wait that long with room to spare.
WAIT_NAMED = "the longest waited"
WORKERS = 4


def run_suite(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    dsn: str,
    *,
    driver: str,
    places: list[str],
    tell_the_plugin: bool,
) -> tuple[pytest.RunResult, list[dict[str, object]]]:
    """The suite at ``-n 4`` under poolaware; ``tell_the_plugin``: POOLAWARE_DSN is set
    (else the plugin learns the server from the workers' first connection)."""
    log = pytester.path / "connects.jsonl"
    monkeypatch.setenv("SUITE_DSN", dsn)
    monkeypatch.setenv("SUITE_DRIVER", driver)
    monkeypatch.setenv("SUITE_PLACES", ",".join(places))
    monkeypatch.setenv("SUITE_LOG", str(log))
    if tell_the_plugin:
        monkeypatch.setenv("POOLAWARE_DSN", dsn)
    else:
        monkeypatch.delenv("POOLAWARE_DSN", raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_queries=TESTS)
    result = run(pytester, "-n", str(WORKERS), "--dist", "poolaware")
    logged = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, logged


def assert_prompt_and_counted(
    result: pytest.RunResult,
    logged: list[dict[str, object]],
    places: list[str],
    *,
    learned: bool,
) -> None:
    """``learned``: no DSN was given, so connects wait, one at a time, while the server's
    room is read from the first one (``docs/design.md``, "Learning the server"): on a
    busy machine that read may take a second or two, which the summary then names."""
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=12)
    assert connection_errors(result) == 0
    assert "INTERNALERROR" not in result.stdout.str()
    assert "for connection budget" not in result.stdout.str()  # "waited 30s for ..."
    for place in places:
        waits = [float(e["seconds"]) for e in logged if e["place"] == place]  # type: ignore[arg-type]
        # xdist may end a worker while its ``pytest_unconfigure`` still runs (it stops
        # the workers once they have finished their sessions): those connects may not
        # get to log anything.
        if place != "unconfigure":
            assert len(waits) == WORKERS, (place, logged)
        assert max(waits, default=0.0) < PROMPT, (place, waits)
    by_name: dict[str, int] = {}
    for place in places:
        if place in SUMMARY_NAME:
            name = SUMMARY_NAME[place]
            by_name[name] = by_name.get(name, 0) + WORKERS
    total = sum(by_name.values())
    line = next((ln for ln in result.stdout.lines if "connections opened outside tests" in ln), "")
    assert f"{total} connections opened outside tests" in line, result.stdout.str()
    for name, count in by_name.items():
        assert f"{count} at {name}" in line, line
    assert "counted in the budget" in line
    if not learned:
        assert WAIT_NAMED not in line


@pytest.mark.parametrize(
    "driver", ["psycopg", "psycopg2", "asyncpg", "sqlalchemy", "sqlalchemy-asyncio"]
)
def test_a_suite_connecting_at_session_start_and_finish_runs_every_test_at_once(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    limited_role: Callable[[int], str],
    driver: str,
) -> None:
    """SQLAlchemy's own suite's shape: each worker provisions in ``pytest_sessionstart``
    (keeping the connection, sync drivers) and cleans up in ``pytest_sessionfinish``; no
    DSN given, so the plugin learns the server from those very connections."""
    places = ["sessionstart", "sessionfinish"]
    result, logged = run_suite(
        pytester,
        monkeypatch,
        limited_role(ROLE_LIMIT),
        driver=driver,
        places=places,
        tell_the_plugin=False,
    )
    assert_prompt_and_counted(result, logged, places, learned=True)


@pytest.mark.parametrize("tell_the_plugin", [True, False], ids=["dsn-given", "learned"])
def test_connections_in_every_place_outside_tests_are_admitted_at_once_and_counted(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    limited_role: Callable[[int], str],
    tell_the_plugin: bool,
) -> None:
    places = ["import", "configure", "sessionstart", "collection", "sessionfinish", "unconfigure"]
    result, logged = run_suite(
        pytester,
        monkeypatch,
        limited_role(ROLE_LIMIT),
        driver="psycopg",
        places=places,
        tell_the_plugin=tell_the_plugin,
    )
    assert_prompt_and_counted(result, logged, places, learned=not tell_the_plugin)


def test_a_worker_failing_at_session_start_shows_its_own_error_as_under_load(
    pytester: pytest.Pytester,
) -> None:
    """A worker whose ``pytest_sessionstart`` raises: xdist reports the worker's own
    exception and replaces it (as under ``--dist load``); the run ends, the error shown."""
    pytester.makeconftest(
        """
import os
def pytest_sessionstart(session):
    if os.environ.get("PYTEST_XDIST_WORKER") == "gw1":
        raise RuntimeError("provisioning failed on gw1")
"""
    )
    pytester.makepyfile("def test_one():\n    pass\n")
    results = {dist: run(pytester, "-n", "2", "--dist", dist) for dist in ("load", "poolaware")}
    for dist, result in results.items():
        assert "RuntimeError: provisioning failed on gw1" in result.stdout.str(), dist
    assert results["poolaware"].ret == results["load"].ret
