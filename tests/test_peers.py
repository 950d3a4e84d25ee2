"""The peers check's own logic (``peers/``): junitxml read back, runs compared test by test.

No peer is downloaded and no server is needed: the junitxml files come from real pytest
runs of small suites made here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"

MIXED_SUITE = """
import pytest

def test_passes():
    pass

def test_fails():
    assert False

@pytest.fixture
def broken():
    raise RuntimeError("setup")

def test_errors(broken):
    pass

def test_skipped():
    pytest.skip("not here")

@pytest.mark.xfail(strict=True)
def test_expected_to_fail():
    assert False

@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("teardown")

def test_fails_then_errors(broken_teardown):
    assert False

@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    pass
"""


def load(name: str) -> ModuleType:
    """A module of ``peers/`` (scripts, not a package: they import each other by name)."""
    spec = importlib.util.spec_from_file_location(f"peers_{name}", PEERS_DIR / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being made
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture(scope="module")
def outcomes() -> ModuleType:
    return load("outcomes")


def junit_of(pytester: pytest.Pytester, source: str, *args: str) -> Path:
    """Run ``source`` as a test module in a pytest of its own; its junitxml file."""
    pytester.makepyfile(test_mixed=source)
    junit = pytester.path / "junit.xml"
    pytester.runpytest_subprocess("-p", "no:randomly", f"--junitxml={junit}", *args)
    return junit


def run_of(outcomes: ModuleType, label: str, tests: dict[str, str], status: int = 0) -> object:
    return outcomes.RunOutcomes(label, status, tests)


def test_each_test_s_outcome_is_read_from_a_real_junitxml(
    pytester: pytest.Pytester, outcomes: ModuleType
) -> None:
    found = outcomes.read_junit(junit_of(pytester, MIXED_SUITE))
    assert found == {
        "test_mixed::test_passes": "passed",
        "test_mixed::test_fails": "failed",
        "test_mixed::test_errors": "error",
        "test_mixed::test_skipped": "skipped",
        "test_mixed::test_expected_to_fail": "skipped",
        "test_mixed::test_fails_then_errors": "failed+error",
        "test_mixed::test_param[1]": "passed",
        "test_mixed::test_param[2]": "passed",
    }


def test_a_run_that_ends_in_an_internal_error_ran_no_test(
    pytester: pytest.Pytester, outcomes: ModuleType
) -> None:
    pytester.makeconftest(
        """
        def pytest_runtestloop(session):
            raise RuntimeError("the scheduler broke")
        """
    )
    junit = junit_of(pytester, MIXED_SUITE)
    broken = outcomes.RunOutcomes("poolaware-cold", 3, outcomes.read_junit(junit))
    assert broken.internal_error
    assert broken.tests == {}
    load = run_of(outcomes, "load", {"t::a": "passed"})
    assert outcomes.problems(load, broken) == [
        "poolaware-cold: no test ran, exit status 3 (INTERNALERROR)"
    ]


def test_runs_alike_test_by_test_have_no_problem(outcomes: ModuleType) -> None:
    tests = {"t::a": "passed", "t::b": "failed", "t::c": "skipped"}
    assert (
        outcomes.problems(run_of(outcomes, "load", tests, 1), run_of(outcomes, "pw", tests, 1))
        == []
    )


def test_the_same_counts_with_other_tests_failing_is_a_difference(outcomes: ModuleType) -> None:
    """One test failing and another passing in its place: counts alike, outcomes not."""
    load = run_of(outcomes, "load", {"t::a": "passed", "t::b": "failed", "t::c": "skipped"}, 1)
    pool = run_of(
        outcomes, "poolaware-warm", {"t::a": "failed", "t::b": "passed", "t::c": "skipped"}, 1
    )
    assert outcomes.problems(load, pool) == [
        "poolaware-warm: 2 tests differ from load:",
        "    t::a: load passed, poolaware-warm failed",
        "    t::b: load failed, poolaware-warm passed",
    ]


def test_a_missing_test_and_another_exit_status_are_differences(outcomes: ModuleType) -> None:
    load = run_of(outcomes, "load", {"t::a": "passed", "t::b": "passed"})
    pool = run_of(
        outcomes, "poolaware-cold", {"t::a": "passed", "t::c": "passed", "t::d": "error"}, 1
    )
    assert outcomes.problems(load, pool) == [
        "poolaware-cold: 3 tests, load: 2 tests",
        "poolaware-cold: exit status 1, load: 0",
        "poolaware-cold: 3 tests differ from load:",
        "    t::b: load passed, poolaware-cold absent",
        "    t::c: load absent, poolaware-cold passed",
        "    t::d: load absent, poolaware-cold error",
    ]


def test_a_reference_run_without_tests_is_reported_once(outcomes: ModuleType) -> None:
    load = outcomes.RunOutcomes("load", 4, {}, "no junitxml written")
    cold = run_of(outcomes, "poolaware-cold", {"t::a": "passed"})
    warm = outcomes.RunOutcomes("poolaware-warm", 3, {outcomes.INTERNAL_ERROR: "error"})
    assert outcomes.compare_runs(load, [cold, warm]) == [
        "load: no test ran, exit status 4 (no junitxml written)",
        "poolaware-warm: no test ran, exit status 3 (INTERNALERROR)",
    ]


def test_each_poolaware_run_is_compared_with_load(outcomes: ModuleType) -> None:
    load = run_of(outcomes, "load", {"t::a": "passed", "t::b": "passed"})
    cold = run_of(outcomes, "poolaware-cold", {"t::a": "error", "t::b": "passed"}, 1)
    warm = run_of(outcomes, "poolaware-warm", {"t::a": "passed", "t::b": "passed"})
    assert outcomes.compare_runs(load, [cold, warm]) == [
        "poolaware-cold: exit status 1, load: 0",
        "poolaware-cold: 1 tests differ from load:",
        "    t::a: load passed, poolaware-cold error",
    ]
    assert outcomes.compare_runs(load, [warm, warm]) == []


def test_a_long_list_of_differences_is_cut_with_a_count(outcomes: ModuleType) -> None:
    many = outcomes.MAX_LISTED + 7
    load = run_of(outcomes, "load", {f"t::{n:03}": "passed" for n in range(many)})
    pool = run_of(outcomes, "pw", {f"t::{n:03}": "error" for n in range(many)}, 1)
    lines = outcomes.problems(load, pool)
    assert lines[1] == f"pw: {many} tests differ from load:"
    assert len(lines) == 2 + outcomes.MAX_LISTED + 1
    assert lines[-1] == "    ... and 7 more"
    # Two runs alike in their differences: both are listed in full.
    assert outcomes.compare_runs(load, [pool, pool]) == lines + lines


def test_every_peer_is_pinned_to_one_version_with_a_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PEERS_DIR))  # run.py imports outcomes.py by name
    run = load("run")
    assert run.PEERS
    for peer in run.PEERS:
        name, version = run.pinned_version(peer)
        assert name
        assert version
        assert peer.modules
        assert all(module.startswith("test") and module.endswith(".py") for module in peer.modules)
    assert [mode.dist for mode in run.MODES] == ["load", "poolaware", "poolaware"]
