"""End to end: what runs learn lasts. A filtered run (``-k``, ``--lf``, a path, ``-x``)
keeps the learned data of the tests it did not collect; only a run of the whole suite,
or a deleted file, forgets any. A team's history file plans a run with no cache; and
within a run, a measured test plans its relatives not measured yet."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
from inner import ENGINE_CONFTEST, poolaware_run

from pytest_poolaware.scheduler import run_selection
from pytest_poolaware.shared.protocol import Collected

WORKERS = "2"
MODULES = 3
#: Tests in each module; ``test_2`` of the first module fails when asked.
PER_MODULE = 3
TESTS = MODULES * PER_MODULE
FAILS_WHEN = "HISTORY_SUITE_FAILS"

MODULE = "\n".join(
    [
        "import os",
        "",
        *(f"def test_{n}():\n    pass\n" for n in range(PER_MODULE - 1)),
        f"def test_{PER_MODULE - 1}():",
        f"    assert not (os.environ.get({FAILS_WHEN!r}) and __name__.endswith('0'))",
        "",
    ]
)


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(**{f"test_m{n}": MODULE for n in range(MODULES)})
    return pytester


def poolaware(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict[str, Any]]:
    """One poolaware run; its result and JSON report."""
    return poolaware_run(pytester, WORKERS, *args)


def test_filtered_runs_keep_what_the_full_run_plans_with(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAILS_WHEN, "1")
    result, cold = poolaware(suite)
    result.assert_outcomes(passed=TESTS - 1, failed=1)
    assert cold["run"]["learned"] == 0

    filtered = [
        (("-k", "test_0"), MODULES),
        (("--lf",), 1),
        (("test_m1.py",), PER_MODULE),
        (("test_m2.py::test_1",), 1),
        (("-x",), None),  # stops at the failure: how many ran before depends on timing
    ]
    for args, ran in filtered:
        result, data = poolaware(suite, *args)
        assert ran is None or len(data["tests"]) == ran, args
        assert data["run"]["learned"] == len(data["tests"]), args
        assert not any("forgot" in note for note in data["run"]["notes"]), args

    monkeypatch.delenv(FAILS_WHEN)
    result, warm = poolaware(suite)
    result.assert_outcomes(passed=TESTS)
    assert warm["run"]["learned"] == TESTS


def test_a_deleted_file_is_forgotten_by_a_filtered_run_and_the_rest_kept(
    suite: pytest.Pytester,
) -> None:
    poolaware(suite)[0].assert_outcomes(passed=TESTS)
    (suite.path / "test_m2.py").unlink()
    result, data = poolaware(suite, "-k", "test_0")
    result.assert_outcomes(passed=MODULES - 1)
    forgot = f"forgot the learned data of {PER_MODULE} tests that no longer exist"
    assert forgot in data["run"]["notes"]
    (suite.path / "test_m1.py").write_text(MODULE.replace("def test_0", "def test_renamed"))
    result, data = poolaware(suite)
    result.assert_outcomes(passed=TESTS - PER_MODULE)
    assert data["run"]["learned"] == TESTS - PER_MODULE - 1  # the renamed test is new
    assert "forgot the learned data of 1 tests that no longer exist" in data["run"]["notes"]


def test_a_fresh_checkout_plans_with_the_teams_history_file(suite: pytest.Pytester) -> None:
    """The file a run stored plans a run with no cache, as a fresh CI runner's; the file
    lists every test on a line of its own, sorted."""
    history = suite.path / "ci" / "poolaware-history.json"
    history.parent.mkdir()
    args = (f"--poolaware-history={history}", "--poolaware-store-history")
    result, cold = poolaware(suite, *args)
    result.assert_outcomes(passed=TESTS)
    assert cold["run"]["learned"] == 0
    lines = history.read_text().splitlines()
    assert lines[3:-2] == sorted(lines[3:-2])
    assert len(json.loads(history.read_text())["tests"]) == len(lines) - 5 == TESTS

    shutil.rmtree(suite.path / ".pytest_cache")
    result, warm = poolaware(suite, f"--poolaware-history={history}")
    result.assert_outcomes(passed=TESTS)
    assert warm["run"]["learned"] == TESTS
    assert not warm["run"]["notes"]


def test_a_corrupt_history_file_is_a_note_and_a_cold_run(suite: pytest.Pytester) -> None:
    history = suite.path / "poolaware-history.json"
    history.write_text('{"schema": 1, "tests": {"test_m0.py::test_0": [1, "fast"]')
    result, data = poolaware(suite, "--poolaware-history=poolaware-history.json")
    result.assert_outcomes(passed=TESTS)
    assert data["run"]["learned"] == 0
    result.stdout.fnmatch_lines(["*learned data in*poolaware-history.json is not valid JSON*"])
    assert result.ret == pytest.ExitCode.OK


HEAVY_FAMILY = """
import pytest
from conftest import hold

@pytest.mark.serial_only
@pytest.mark.parametrize("n", range(4))
def test_heavy(engine, n):
    hold(engine, 3, 0.05)
"""


def test_a_first_run_plans_later_parametrizations_with_the_first_ones_need(
    pytester: pytest.Pytester, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cold: nothing learned, yet once a parametrization is measured the ones not started
    yet go with its need; the report marks them."""
    monkeypatch.setenv("POOLAWARE_DSN", postgres_dsn)
    pytester.makeconftest(ENGINE_CONFTEST)
    pytester.makepyfile(test_family=HEAVY_FAMILY)
    result, data = poolaware(pytester, "--pool-budget", "10")
    result.assert_outcomes(passed=4)
    assert data["run"]["learned"] == 0
    priors = {test["nodeid"]: test["prior"] for test in data["tests"]}
    assert priors["test_family.py::test_heavy[0]"] is None  # the first: nothing known
    assert priors["test_family.py::test_heavy[3]"] == 3
    assert data["run"]["priors"] == sum(prior is not None for prior in priors.values())


@pytest.mark.parametrize(
    ("ini", "args", "whole"),
    [
        ("", [], True),
        ("", ["."], True),
        ("", ["tests"], False),  # the rootdir may hold other tests
        ("testpaths = tests", [], True),
        ("testpaths = tests", ["tests"], True),
        ("testpaths = tests", ["tests/test_a.py"], False),
        ("testpaths = tests", ["tests/test_a.py::test_x"], False),
        ("", ["-k", "x"], False),
        ("", ["-m", "slow"], False),
        ("", ["--lf"], False),
        ("", ["--ff"], True),  # reorders, runs everything
    ],
)
def test_what_counts_as_a_run_of_the_whole_suite(
    pytester: pytest.Pytester, ini: str, args: list[str], whole: bool
) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.mkdir("tests").joinpath("test_a.py").write_text("def test_x():\n    pass\n")
    config = pytester.parseconfig(*args)
    assert run_selection(config, Collected(())).whole_suite is whole


def test_a_run_from_below_the_rootdir_or_that_left_tests_out_is_not_the_whole_suite(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\n")
    tests = pytester.mkdir("tests")
    assert run_selection(pytester.parseconfig(), Collected(())).whole_suite
    for reported in (Collected((), deselected=1), Collected((), uncollected=1)):
        assert not run_selection(pytester.parseconfig(), reported).whole_suite
    monkeypatch.chdir(tests)
    assert not run_selection(pytester.parseconfig(), Collected(())).whole_suite
