"""Several runs against one server: what they learn, and how they share its room."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from inner import CONNECTION_ERRORS, RUN_TIMEOUT, execnet_socket_servers
from test_scheduling import CONFTEST, SUITE

from pytest_poolaware.share import Others, fair_shares, plan, shares_with_priority
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
        self.log = root / "events.jsonl"
        command = [sys.executable, "-m", "pytest", "-p", "no:randomly", *args]
        self.process = subprocess.Popen(
            command,
            cwd=root,
            env={**os.environ, "POOLAWARE_TEST_LOG": str(self.log)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = ""

    def tests_done(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0

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

    def history(self, *, required: bool = True) -> dict[str, list[Any]]:
        """What the run learned; with ``required=False``, nothing when it saved nothing
        (a run that the other one left no room to start, say)."""
        path = self.root / ".pytest_cache" / "d" / "poolaware" / "history.json"
        if not required and not path.exists():
            return {}
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
    for name, value in POOL_ENV.items():
        monkeypatch.setenv(name, value)
    return str(psycopg.conninfo.conninfo_to_dict(role_dsn)["user"])


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
    learned = first.history(required=False)  # only shown when the run alone is wrong
    alone = Run(first.root, *args)
    assert alone.wait() == 0, alone.output
    after = alone.history()
    for nodeid, entry in after.items():
        need = entry[0]
        assert need is not None, (nodeid, entry)
        assert need <= real_need(nodeid), (nodeid, entry, learned.get(nodeid))


# -- the pure part ----------------------------------------------------------------------------


def test_fair_shares_give_what_is_asked_and_split_the_rest_evenly() -> None:
    assert fair_shares(14, {1: 15}) == {1: 14}
    assert fair_shares(14, {1: 15, 2: 15}) == {1: 7, 2: 7}
    assert fair_shares(14, {1: 3, 2: 15}) == {1: 3, 2: 11}
    assert fair_shares(5, {2: 9, 1: 9}) == {1: 3, 2: 2}  # the same split seen from both
    assert fair_shares(0, {1: 4}) == {1: 0}
    assert fair_shares(6, {1: 0, 2: 2}) == {1: 0, 2: 2}


def test_the_priority_is_served_first_and_leaves_every_other_run_one() -> None:
    assert shares_with_priority(14, {1: 15, 2: 15}, (2, 12)) == {1: 2, 2: 12}
    assert shares_with_priority(14, {1: 1, 2: 15}, (2, 12)) == {1: 1, 2: 13}
    assert shares_with_priority(14, {1: 15, 2: 15, 3: 4}, (2, 14)) == {1: 1, 2: 12, 3: 1}
    assert shares_with_priority(14, {1: 15}, (9, 12)) == {1: 14}  # a run that has gone


NOBODY = Others({}, {})


def test_a_run_alone_takes_the_whole_room() -> None:
    step = plan(me=1, allows=16, held=0, demand=15, in_use=0, others=NOBODY, live_others=0)
    # 16, less its own connection and one slot for connections still closing.
    assert (step.hold, step.budget, step.share, step.held_back) == (14, 14, 14, False)


def test_a_second_run_waits_for_the_first_to_give_back_what_it_does_not_use() -> None:
    first = Others({1: 15}, {1: 15})  # 14 for its tests, 1 for its own connection
    # The newcomer sees no free slot: it takes none, and waits with one connection.
    step = plan(me=2, allows=16, held=0, demand=15, in_use=0, others=first, live_others=15)
    assert (step.hold, step.share, step.held_back) == (0, 6, True)
    # The first run, above its share, gives back only what it does not use.
    second = Others({2: 1}, {2: 15})
    step = plan(me=1, allows=16, held=14, demand=15, in_use=10, others=second, live_others=1)
    assert (step.hold, step.budget, step.share) == (10, 7, 7)


def test_connections_that_outlive_a_run_are_not_leased_out_twice() -> None:
    """A killed run's workers may hold connections for a moment after its leases died."""
    step = plan(me=1, allows=16, held=4, demand=15, in_use=4, others=NOBODY, live_others=9)
    assert step.hold == 5  # 16 - 1 own - 1 closing - 9 lingering
    assert step.share == 5  # they count as clients that take no part, for now


def test_a_run_with_work_left_keeps_its_last_lease() -> None:
    heavy = Others({2: 14}, {2: 15}, priority=(2, 13))
    step = plan(me=1, allows=16, held=1, demand=3, in_use=0, others=heavy, live_others=14)
    assert (step.hold, step.budget) == (1, 1)


# -- remote workers ---------------------------------------------------------------------------

SOCKET_WORKERS = 4


@pytest.fixture
def socket_servers(shared_role: str, tmp_path: Path) -> Iterator[list[str]]:
    """execnet socket servers on localhost, one per worker (each serves one gateway at
    a time), started with the suite's environment as a remote machine would have it."""
    with execnet_socket_servers(SOCKET_WORKERS) as addresses:
        yield addresses


def test_workers_behind_socket_gateways_keep_the_budget(
    shared_role: str, socket_servers: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = checkout(tmp_path / "remote")
    for name in POOL_ENV:
        monkeypatch.delenv(name)
    tx = [arg for address in socket_servers for arg in ("--tx", f"socket={address}//chdir={root}")]
    run = Run(root, "--dist", "poolaware", *tx, "--cache-clear")
    assert run.wait() == 0, run.output
    assert f"{SUITE_TESTS} passed" in run.output
    assert run.connection_errors() == 0, run.output
    assert RERUN_SERVER not in run.output
    source = (
        f"role {shared_role} CONNECTION LIMIT {ROLE_LIMIT}, 1 kept for the monitor, "
        "1 for connections still closing"
    )
    assert f"budget: 14 connections ({source})" in run.output
    # Counts came from every worker: the workers' peak is measured, not zero.
    assert "peak open connections (workers): 0" not in run.output


DROPPING_SUITE = """
import time
import pytest
from sqlalchemy import text
from conftest import hold

@pytest.mark.serial_only
def test_cut_the_plugin_connection(engine):
    with engine.connect() as conn:
        cut = conn.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'pytest-poolaware-monitor' AND usename = current_user"
        )).scalar()
    assert cut == 1
    time.sleep(0.5)  # the sampler and the leases notice on their next look

@pytest.mark.parametrize("n", range(12))
def test_after(engine, n):
    hold(engine, 2, 0.05)
"""


def test_a_coordinating_connection_that_drops_mid_run_is_a_note(
    shared_role: str, tmp_path: Path
) -> None:
    root = checkout(tmp_path / "cut")
    (root / "test_suite.py").write_text(DROPPING_SUITE)
    run = Run(root, "-n", "2", "--dist", "poolaware", "--poolaware-share", "auto")
    assert run.wait() == 0, run.output
    assert "13 passed" in run.output
    assert "note: sharing the server's room stopped: " in run.output
    assert "note: server monitoring stopped after " in run.output
