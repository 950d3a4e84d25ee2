"""What the end-to-end tests share: inner pytest runs and the sources of their suites."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

#: Bound on every inner run: a scheduler that hangs fails the test instead of the CI job.
RUN_TIMEOUT = 180

#: An inner conftest: one pool per worker process, kept for the session (what multiplies
#: connections), and ``hold`` to check out several connections at once.
ENGINE_CONFTEST = """
import os
import pytest
from sqlalchemy import text
from pytest_poolaware.engine import make_engine

@pytest.fixture(scope="session")
def engine():
    engine = make_engine(os.environ["POOLAWARE_DSN"])
    yield engine
    engine.dispose()

def hold(engine, connections, seconds):
    conns = [engine.connect() for _ in range(connections)]
    try:
        for conn in conns:
            conn.execute(text("select 1"))
        conns[0].execute(text("select pg_sleep(:s)"), {"s": seconds})
    finally:
        for conn in conns:
            conn.close()
"""

#: An inner conftest fixture logging each test's worker, lane and times to
#: ``$POOLAWARE_TEST_LOG``, so the outer test can check order and overlap.
RECORDING_CONFTEST = """
import json, os, time
import pytest

@pytest.fixture(autouse=True)
def _record(request):
    start = time.time()
    yield
    entry = {
        "nodeid": request.node.nodeid,
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "serial": request.node.get_closest_marker("serial_only") is not None,
        "start": start,
        "end": time.time(),
    }
    with open(os.environ["POOLAWARE_TEST_LOG"], "a") as log:
        log.write(json.dumps(entry) + "\\n")
"""

#: Two database-free tests, one per marker.
TWO_TESTS = """
import pytest

@pytest.mark.serial_only
def test_heavy():
    pass

@pytest.mark.parallel_safe
def test_light():
    pass
"""

CONNECTION_ERRORS = ("too many connections", "too many clients", "QueuePool limit")

#: Pool sizing the teams in our write-up use; the budget defaults to their sum (15).
POOL_ENV = {"PG_POOL_SIZE": "5", "PG_MAX_OVERFLOW": "10"}
#: A role limit just above that budget, as in the write-up's CI database.
ROLE_LIMIT = 16
#: The password of ``secret_role``: it must never appear in anything a run shows or writes.
ROLE_PASSWORD = "learn-secret-5e1f"


def serve_limited_role(
    limited_role: Callable[[int], str], limit: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str]:
    """Inner runs connect as a fresh role limited to ``limit`` connections, with the pool
    variables of POOL_ENV: (its DSN, its name)."""
    dsn = limited_role(limit)
    monkeypatch.setenv("POOLAWARE_DSN", dsn)
    for name, value in POOL_ENV.items():
        monkeypatch.setenv(name, value)
    return dsn, str(psycopg.conninfo.conninfo_to_dict(dsn)["user"])


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """An inner run in a subprocess (real xdist workers), bounded by RUN_TIMEOUT."""
    return pytester.runpytest_subprocess(*args, "-p", "no:randomly", timeout=RUN_TIMEOUT)


def poolaware_run(
    pytester: pytest.Pytester, workers: str, *args: str
) -> tuple[pytest.RunResult, dict[str, Any]]:
    """One poolaware run on ``workers`` workers: its result and its JSON report."""
    report = pytester.path / "report.json"
    result = run(
        pytester, "-n", workers, "--dist", "poolaware", f"--poolaware-report={report}", *args
    )
    data: dict[str, Any] = json.loads(report.read_text())
    return result, data


def entries(log: Path) -> list[dict[str, Any]]:
    """What RECORDING_CONFTEST logged."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def connection_errors(result: pytest.RunResult) -> int:
    text = result.stdout.str()
    return sum(text.count(marker) for marker in CONNECTION_ERRORS)


def reported(result: pytest.RunResult) -> dict[str, str]:
    """Outcome per node id, from the ``-rA`` short summary."""
    outcomes = {}
    for line in result.stdout.lines:
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR", "SKIPPED") and "::" in rest:
            outcomes[rest.split(" - ")[0].strip()] = word
    return outcomes


#: Bound on waiting for a helper server (socket server, pgbouncer) to listen, in seconds.
LISTEN_WAIT = 30.0


def wait_listening(port: int, process: subprocess.Popen[Any], why: str = "") -> None:
    """Wait, bounded, until ``process`` accepts connections on localhost ``port``."""
    deadline = time.monotonic() + LISTEN_WAIT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert process.poll() is None, f"it exited before listening on {port}. {why}"
            assert time.monotonic() < deadline, f"nothing listens on port {port}"
            time.sleep(0.05)


def free_port() -> int:
    """A localhost port nothing listens on now (for a helper server a test starts)."""
    import port_for  # with the test server's package: the package checks run without it

    port: int = port_for.select_random()
    return port


@contextlib.contextmanager
def execnet_socket_servers(count: int) -> Iterator[list[str]]:
    """execnet socket servers on localhost (``HOST:PORT`` each), one per worker: each
    serves one gateway, started with this environment as a remote machine would have it."""
    import execnet.script.socketserver as server_script

    ports = [free_port() for _ in range(count)]
    servers = [
        subprocess.Popen(
            [sys.executable, server_script.__file__, f"127.0.0.1:{port}"],
            env={**os.environ, "POOLAWARE_TEST_LOG": os.devnull},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for port, process in zip(ports, servers, strict=True):
            wait_listening(port, process)
        yield [f"127.0.0.1:{port}" for port in ports]
    finally:
        for process in servers:
            process.kill()
            process.wait()
