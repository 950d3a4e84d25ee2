"""Several runs against one server: what they learn, and how they share its room."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from inner import CONNECTION_ERRORS, RUN_TIMEOUT
from test_scheduling import CONFTEST, SUITE

from pytest_poolaware.worker import RERUN_SERVER

ROLE_LIMIT = 16
POOL_ENV = {"PG_POOL_SIZE": "5", "PG_MAX_OVERFLOW": "10"}
#: What each test of test_scheduling.SUITE holds at once, by name.
REAL_NEEDS = {
    "TestProvisioning::test_provision": 8,
    "test_light": 1,
    "test_unmarked_heavy": 7,
    "test_unmarked_light": 2,
}
SUITE_TESTS = 39


def real_need(nodeid: str) -> int:
    name = nodeid.split("::", 1)[1].split("[", 1)[0]
    return REAL_NEEDS[name]


class Run:
    """One inner pytest run in its own checkout of the suite, as a CI job would have."""

    def __init__(self, root: Path, *args: str) -> None:
        self.root = root
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "no:randomly",
                "-p",
                "no:hypothesispytest",
                *args,
            ],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = ""

    def wait(self) -> int:
        try:
            self.output, _ = self.process.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.output, _ = self.process.communicate()
            pytest.fail(f"run in {self.root} did not end:\n{self.output}")
        return self.process.returncode

    def connection_errors(self) -> int:
        return sum(self.output.count(marker) for marker in CONNECTION_ERRORS)

    def history(self) -> dict[str, list[Any]]:
        path = self.root / ".pytest_cache" / "d" / "poolaware" / "history.json"
        tests: dict[str, list[Any]] = json.loads(path.read_text())["tests"]
        return tests


def checkout(root: Path) -> Path:
    root.mkdir()
    (root / "conftest.py").write_text(CONFTEST)
    (root / "test_suite.py").write_text(SUITE)
    (root / "pytest.ini").write_text("[pytest]\n")
    return root


@pytest.fixture
def shared_role(limited_role: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    role_dsn: str = limited_role(ROLE_LIMIT)
    monkeypatch.setenv("POOLAWARE_DSN", role_dsn)
    monkeypatch.setenv("POOLAWARE_TEST_LOG", os.devnull)
    for name, value in POOL_ENV.items():
        monkeypatch.setenv(name, value)
    return psycopg.conninfo.conninfo_to_dict(role_dsn)["user"]


def test_what_a_contended_pair_learned_is_not_believed_by_a_run_alone(
    shared_role: str, tmp_path: Path
) -> None:
    """Two runs at once that do not coordinate overshoot the role's limit; the server
    refuses connections. Run alone afterwards, no test is believed to need more than it
    really holds."""
    args = ("-n", "4", "--dist", "poolaware", "--poolaware-share", "off")
    pair = [Run(checkout(tmp_path / name), *args) for name in ("a", "b")]
    for run in pair:
        run.wait()
    first = pair[0]
    # They did meet: the server refused connections to one of them at least.
    assert any(RERUN_SERVER in run.output or run.connection_errors() for run in pair)
    learned = first.history()
    alone = Run(first.root, *args)
    assert alone.wait() == 0, alone.output
    after = alone.history()
    for nodeid, entry in after.items():
        need = entry[0]
        assert need is not None, (nodeid, entry)
        assert need <= real_need(nodeid), (nodeid, entry, learned.get(nodeid))
