"""End to end: each worker runs its tests in collection order, as with ``--dist load``.

A suite with a planted order dependency: module B changes process-wide state (a registry
its module shares with A) that breaks module A's tests when they run after B in one
process; A comes before B in collection order, so ``load`` never exposes it. Learned
durations must not change that, whatever they are.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from inner import ENGINE_CONFTEST, poolaware_run, run

#: Warm runs, each with learned durations drawn at random (the first one adversarial).
#: Few: the planner's property tests (test_core) draw many more durations; these runs
#: check that the order the planner keeps is the order the workers run.
WARM_RUNS = 3
#: Seed of the drawn durations: a failure names the run, and reruns reproduce it.
SEED = 20261202
WORKERS = "4"

REGISTRY = """
#: Process-wide state, as real suites have (a registry filled at import time).
ACCEPTED = {"alpha", "beta"}
"""

#: Reads the registry: breaks once B has run in the same process.
MODULE_A = """
import pytest
from sqlalchemy import text
import registry

@pytest.mark.parametrize("n", range(10))
def test_accepts_only_the_builtin_names(engine, n):
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    assert registry.ACCEPTED == {"alpha", "beta"}
"""

#: Serial tests between A and B in collection order that leave the registry changed:
#: the serial lane's worker must not run A's tests after them.
MODULE_SERIAL = """
import pytest
import registry

@pytest.mark.serial_only
@pytest.mark.parametrize("n", range(4))
def test_serial_plugin(n):
    registry.ACCEPTED.add(f"serial{n}")
"""

#: Changes the registry: A's tests fail if they run after this in one process.
MODULE_B = """
import pytest
import registry

@pytest.mark.parametrize("n", range(10))
def test_registers_a_plugin(n):
    registry.ACCEPTED.add(f"plugin{n}")
"""

FILLER = """
import pytest

@pytest.mark.parametrize("n", range(6))
def test_filler(n):
    pass
"""

MODULES = {
    "test_a_parser": MODULE_A,
    "test_b_filler": FILLER,
    "test_c_serial": MODULE_SERIAL,
    "test_d_plugins": MODULE_B,
    "test_e_filler": FILLER,
    "test_f_filler": FILLER,
}
TESTS = 10 + 6 + 4 + 10 + 6 + 6


@pytest.fixture
def planted(
    pytester: pytest.Pytester, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    monkeypatch.setenv("POOLAWARE_DSN", postgres_dsn)
    pytester.makeconftest(ENGINE_CONFTEST)
    pytester.makepyfile(registry=REGISTRY, **MODULES)
    return pytester


def learn(root: Path, durations: dict[str, float]) -> None:
    """Write learned data as an earlier run would have (needs of 1 connection)."""
    path = root / ".pytest_cache" / "d" / "poolaware" / "history.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tests = {nodeid: [1, duration] for nodeid, duration in durations.items()}
    path.write_text(json.dumps({"schema": 1, "tests": tests}))


def worker_order(report: dict[str, Any]) -> dict[str, list[int]]:
    """Collection indices each worker started, in the order it started them."""
    started: dict[str, list[tuple[float, int]]] = {}
    for index, test in enumerate(report["tests"]):
        started.setdefault(test["worker"], []).append((test["start"], index))
    return {worker: [i for _, i in sorted(s)] for worker, s in started.items()}


def poolaware(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict[str, Any]]:
    """One poolaware run; its result and JSON report."""
    return poolaware_run(pytester, WORKERS, *args)


def in_order(pytester: pytest.Pytester, *args: str) -> dict[str, Any]:
    """A poolaware run that passes every test, each worker in collection order."""
    result, data = poolaware(pytester, *args)
    result.assert_outcomes(passed=TESTS)
    for worker, indices in worker_order(data).items():
        assert indices == sorted(indices), (worker, indices)
    assert (data["run"]["order"], data["run"]["placement"]) == ("collection", "ranges")
    return data


def adversarial(nodeids: list[str]) -> dict[str, float]:
    """What the longest-first ordering of learned durations got wrong: the module that
    changes the registry, and the serial tests, are the longest."""
    return {
        nodeid: 2.0 if "plugins" in nodeid or "serial" in nodeid else 0.01 for nodeid in nodeids
    }


def test_the_planted_dependency_passes_under_load(planted: pytest.Pytester) -> None:
    run(planted, "-n", WORKERS, "--dist", "load").assert_outcomes(passed=TESTS)


def test_poolaware_keeps_each_workers_collection_order_cold_and_warm(
    planted: pytest.Pytester,
) -> None:
    """Cold, then warm runs over learned durations drawn at random: every test passes,
    and each worker started its tests in ascending collection order."""
    cold = in_order(planted, "--cache-clear")
    assert cold["run"]["learned"] == 0
    nodeids = [test["nodeid"] for test in cold["tests"]]
    rng = random.Random(SEED)
    for attempt in range(WARM_RUNS):
        if attempt == 0:
            durations = adversarial(nodeids)
        else:
            durations = {nodeid: rng.choice([0.0, 0.01, 0.3, 1.5, 4.0]) for nodeid in nodeids}
        learn(planted.path, durations)
        assert in_order(planted)["run"]["learned"] == TESTS


def test_duration_order_is_opt_in_and_reorders_workers(planted: pytest.Pytester) -> None:
    """``poolaware_order = duration`` sends the longest modules first: the risk its
    documentation names, shown on the planted dependency (and recorded in the report)."""
    planted.makeini("[pytest]\npoolaware_order = duration\n")
    _, cold = poolaware(planted, "--cache-clear")
    learn(planted.path, adversarial([test["nodeid"] for test in cold["tests"]]))
    result, warm = poolaware(planted)
    assert (warm["run"]["order"], warm["run"]["placement"]) == ("duration", "shared")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) > 0
    assert any(indices != sorted(indices) for indices in worker_order(warm).values())
