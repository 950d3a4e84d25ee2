"""The tiers (tests/tiers.py): each test in exactly one, and held to it while it runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from inner import run
from tiers import (
    COLLECTED_TIERS,
    DB,
    E2E,
    GUARD,
    TIERS,
    UNIT,
    TierError,
    TierGuard,
    TierViolation,
    program_of,
    tier_of,
)

HERE = Path(__file__).parent


def test_every_collected_test_has_exactly_one_tier(request: pytest.FixtureRequest) -> None:
    collected = request.config.stash[COLLECTED_TIERS]
    assert request.node.nodeid in collected
    assert {nodeid: tiers for nodeid, tiers in collected.items() if len(tiers) != 1} == {}
    assert {tier for (tier,) in collected.values()} <= set(TIERS)


def test_the_fixtures_a_test_uses_give_its_tier() -> None:
    assert tier_of("t", ["tmp_path", "monkeypatch"], []) == UNIT
    assert tier_of("t", ["limited_role", "postgres_dsn"], []) == DB
    assert tier_of("t", ["pytester", "postgres_dsn"], []) == E2E


def test_a_declared_tier_may_only_be_higher_than_the_fixtures_make_it() -> None:
    assert tier_of("t", ["tmp_path"], [DB]) == DB  # a server it starts itself
    assert tier_of("t", ["postgres_dsn"], [E2E]) == E2E  # a program it runs itself
    with pytest.raises(TierError, match="t is marked unit, but its fixtures make it db"):
        tier_of("t", ["secret_role"], [UNIT])
    with pytest.raises(TierError, match="marked db, but its fixtures make it e2e"):
        tier_of("t", ["pytester"], [DB])
    with pytest.raises(TierError, match="several tiers: unit, e2e"):
        tier_of("t", [], [E2E, UNIT])


def popen(*argv: str) -> tuple[object, ...]:
    """A ``subprocess.Popen`` audit event's arguments, as Python raises it."""
    return (argv[0], list(argv), None, None)


def test_a_unit_test_may_start_no_process_at_all() -> None:
    guard = TierGuard()
    guard.enter("tests/test_x.py::test_pure", UNIT)
    with pytest.raises(TierViolation, match=r"test_pure is a unit test, but it started a process"):
        guard.audit("subprocess.Popen", popen("/usr/bin/true"))
    guard.audit("open", ("/etc/hostname", "r", 0))  # anything else is its own business
    assert len(guard.leave()) == 1
    guard.audit("subprocess.Popen", popen("/usr/bin/true"))  # between tests: not watched


def test_a_db_test_may_start_a_server_but_no_python_program() -> None:
    guard = TierGuard()
    guard.enter("t", DB)
    guard.audit("subprocess.Popen", popen("/usr/lib/postgresql/15/bin/initdb", "--pgdata=x"))
    guard.audit("subprocess.Popen", popen("pgbouncer", "config.ini"))
    for event, args in [
        ("subprocess.Popen", popen(sys.executable, "-m", "pytest")),
        ("subprocess.Popen", popen("/bin/sh", "-c", "python3 demo/run.py")),
        ("os.system", ("pytest -n 2",)),
        ("os.fork", ()),
    ]:
        with pytest.raises(TierViolation, match="db tests run no pytest"):
            guard.audit(event, args)
    guard.enter("t", E2E)
    guard.audit("subprocess.Popen", popen(sys.executable, "-m", "pytest"))
    assert guard.leave() == []


def test_the_program_of_each_kind_of_process_start() -> None:
    assert program_of("subprocess.Popen", (None, ["psql", "-c", "x"], None, None)) == "psql"
    assert program_of("subprocess.Popen", popen("/bin/sh", "-c", "  pg_ctl stop")) == "pg_ctl"
    assert program_of("os.system", ("initdb -D data",)) == "initdb"
    assert program_of("os.spawn", (os.P_WAIT, "/bin/ls", ["ls"], {})) == "/bin/ls"
    assert program_of("os.posix_spawn", (b"/bin/ls", [b"ls"], {})) == "/bin/ls"


def test_this_unit_test_is_held_to_its_tier(request: pytest.FixtureRequest) -> None:
    """The guard of this very session: no server is handed out and no process starts."""
    guard = request.config.stash[GUARD]
    # The DSN's fixture takes the server's: whichever the session sets up first is refused.
    refused = r"asked for the server fixture 'postgres_(dsn|server)'"
    with pytest.raises(TierViolation, match=refused):
        request.getfixturevalue("postgres_dsn")
    with pytest.raises(TierViolation, match="started a process"):
        subprocess.run(["true"], check=False)
    assert len(guard.broken) == 2
    guard.broken.clear()  # refused as they should be: this test has not broken its tier


INNER_TESTS = """
import subprocess, sys
import pytest

def test_pure():
    pass

def test_starts_python_and_swallows_the_refusal():
    try:
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    except RuntimeError:
        pass

@pytest.mark.e2e
def test_runs_python():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
"""


def copy_the_tiers(pytester: pytest.Pytester) -> None:
    """This directory's conftest and the modules it imports, for an inner run, with the
    tier markers registered as pyproject.toml does."""
    for name in ("conftest.py", "tiers.py", "inner.py"):
        shutil.copy(HERE / name, pytester.path / name)
    pytester.makeini("[pytest]\naddopts = --strict-markers\nmarkers =\n    " + "\n    ".join(TIERS))


def test_a_test_that_breaks_its_tier_errors_even_when_it_catches_the_refusal(
    pytester: pytest.Pytester,
) -> None:
    copy_the_tiers(pytester)
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = run(pytester, "-rA")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_starts_python_and_swallows_the_refusal*",
            "*test_starts_python_and_swallows_the_refusal broke its tier (unit): it started a"
            " process*unit tests start none*",
        ]
    )
    only_unit = run(pytester, "-m", "unit")
    only_unit.assert_outcomes(passed=2, errors=1, deselected=1)


def test_a_declared_tier_the_fixtures_contradict_stops_the_run(pytester: pytest.Pytester) -> None:
    copy_the_tiers(pytester)
    pytester.makepyfile(
        test_inner="""
        import pytest

        @pytest.mark.unit
        def test_on_the_server(postgres_dsn):
            pass
        """
    )
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*test_on_the_server is marked unit, but its fixtures make it db*"]
    )
