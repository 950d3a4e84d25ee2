"""Faults and odd shapes: ``--dist poolaware`` never hangs, never loses a test."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from inner import RECORDING_CONFTEST, RUN_TIMEOUT, entries, reported, run


@pytest.fixture
def log(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = pytester.path / "events.jsonl"
    monkeypatch.setenv("POOLAWARE_TEST_LOG", str(path))
    pytester.makeconftest(RECORDING_CONFTEST)
    return path


CRASHY = """
import os, pytest

@pytest.mark.serial_only
@pytest.mark.parametrize("i", range(6))
def test_serial(i):
    if i == {serial_crash}:
        os._exit(1)

@pytest.mark.parametrize("i", range(12))
def test_fan(i):
    if i == {fan_crash}:
        os._exit(1)
"""


def test_crash_in_the_serial_lane(pytester: pytest.Pytester, log: Path) -> None:
    pytester.makepyfile(test_crashy=CRASHY.format(serial_crash=2, fan_crash=-1))
    result = run(pytester, "-n", "3", "--dist", "poolaware", "-rA")
    result.assert_outcomes(passed=17, failed=1)
    result.stdout.fnmatch_lines(["*crashed while running*test_serial[[]2[]]*"])
    serial = sorted(
        (e for e in entries(log) if "test_serial" in e["nodeid"]), key=lambda e: e["start"]
    )
    assert [e["nodeid"][-2] for e in serial] == ["0", "1", "3", "4", "5"]
    for before, after in itertools.pairwise(serial):
        assert before["end"] <= after["start"]


#: gw1 collects one test more than the others (say, parametrized from a set's order).
WORKER_DEPENDENT = """
import os, pytest

CASES = 4 if os.environ.get("PYTEST_XDIST_WORKER") == "gw1" else 3

@pytest.mark.serial_only
@pytest.mark.parametrize("i", range(3))
def test_serial(i):
    pass

@pytest.mark.parametrize("i", range(CASES))
def test_fan(i):
    pass
"""


def test_a_worker_collecting_other_tests_is_an_error_and_the_run_still_ends(
    pytester: pytest.Pytester, log: Path
) -> None:
    """The first collection in is the run's, markers included; a worker that collected
    something else is reported, and every test of the run is run."""
    pytester.makepyfile(test_odd=WORKER_DEPENDENT)
    result = run(pytester, "-n", "3", "--dist", "poolaware", "-rA")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    errors = [line for line in result.stdout.lines if "Different tests were collected" in line]
    assert errors, result.stdout.str()
    source = errors[0].split("between ")[1].split(" and ")[0]
    cases = 4 if source == "gw1" else 3
    expected = {f"test_odd.py::test_serial[{i}]" for i in range(3)}
    expected |= {f"test_odd.py::test_fan[{i}]" for i in range(cases)}
    assert reported(result) == dict.fromkeys(expected, "PASSED")
    serial = sorted((e for e in entries(log) if e["serial"]), key=lambda e: e["start"])
    assert len({e["worker"] for e in serial}) == 1
    for before, after in itertools.pairwise(serial):
        assert before["end"] <= after["start"]


def test_crash_in_the_fan_out(pytester: pytest.Pytester, log: Path) -> None:
    pytester.makepyfile(test_crashy=CRASHY.format(serial_crash=-1, fan_crash=5))
    result = run(pytester, "-n", "3", "--dist", "poolaware", "-rA")
    result.assert_outcomes(passed=17, failed=1)
    ran = [e["nodeid"] for e in entries(log)]
    assert len(ran) == len(set(ran)) == 17  # nothing twice, nothing lost


@pytest.mark.parametrize("restarts", ["0", "1"])
def test_when_restarts_run_out_every_test_is_still_reported(
    pytester: pytest.Pytester, log: Path, restarts: str
) -> None:
    pytester.makepyfile(test_crashy=CRASHY.format(serial_crash=2, fan_crash=5))
    result = run(
        pytester, "-n", "3", "--dist", "poolaware", "--max-worker-restart", restarts, "-rA"
    )
    outcomes = reported(result)
    assert len(outcomes) == 18
    assert outcomes["test_crashy.py::test_serial[2]"] == "FAILED"
    not_run = [n for n, o in outcomes.items() if o == "ERROR"]
    for nodeid in not_run:
        assert nodeid not in {e["nodeid"] for e in entries(log)}
    if restarts == "0":
        assert not_run
        result.stdout.fnmatch_lines(["*not run: no worker was left to run it*"])


@pytest.mark.parametrize(
    ("source", "args", "outcomes"),
    [
        ("def test_one():\n    pass\n", ["-n", "3"], {"passed": 1}),
        (
            "import pytest\n@pytest.mark.serial_only\n@pytest.mark.parametrize('i', range(5))\n"
            "def test_s(i):\n    pass\n",
            ["-n", "3"],
            {"passed": 5},
        ),
        (
            "import pytest\n@pytest.mark.parallel_safe\n@pytest.mark.parametrize('i', range(7))\n"
            "def test_p(i):\n    pass\n",
            ["-n", "2"],
            {"passed": 7},
        ),
        (CRASHY.format(serial_crash=-1, fan_crash=-1), ["-n", "1"], {"passed": 18}),
        (CRASHY.format(serial_crash=-1, fan_crash=-1), ["-n", "0"], {"passed": 18}),
        (CRASHY.format(serial_crash=-1, fan_crash=-1), [], {"passed": 18}),
        (
            CRASHY.format(serial_crash=-1, fan_crash=-1),
            ["-n", "2", "-k", "test_serial"],
            {"passed": 6},
        ),
    ],
    ids=[
        "fewer-tests-than-workers",
        "only-serial",
        "only-parallel",
        "n1",
        "n0",
        "no-n",
        "selection",
    ],
)
def test_odd_shapes(
    pytester: pytest.Pytester, source: str, args: list[str], outcomes: dict[str, int]
) -> None:
    pytester.makepyfile(test_shape=source)
    result = run(pytester, "--dist", "poolaware", *args)
    result.assert_outcomes(**outcomes)


def test_empty_selection_exits_5(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_one():\n    pass\n")
    result = run(pytester, "-n", "2", "--dist", "poolaware", "-k", "nothing_matches")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED


def test_without_workers_it_says_it_runs_in_process(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_one():\n    pass\n")
    result = run(pytester, "--dist", "poolaware")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*poolaware: no workers (-n/--tx)*in this process*"])


def test_last_failed_and_failed_first(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        "import os, pytest\n@pytest.mark.parametrize('i', range(6))\n"
        "def test_x(i):\n    assert i != int(os.environ.get('FAIL', '-1'))\n"
    )
    monkeypatch.setenv("FAIL", "3")
    run(pytester, "-n", "2", "--dist", "poolaware").assert_outcomes(passed=5, failed=1)
    monkeypatch.delenv("FAIL")
    run(pytester, "-n", "2", "--dist", "poolaware", "--lf").assert_outcomes(passed=1)
    run(pytester, "-n", "2", "--dist", "poolaware", "--ff").assert_outcomes(passed=6)


@pytest.mark.parametrize("stop", [["-x"], ["--maxfail", "2"]])
def test_stopping_early_leaves_nothing_behind(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    limited_role: Any,
    postgres_dsn: str,
    stop: list[str],
) -> None:
    role_dsn = limited_role(10)
    monkeypatch.setenv("POOLAWARE_DSN", role_dsn)
    pytester.makepyfile(
        """
        import os, pytest
        from sqlalchemy import text
        from pytest_poolaware.engine import make_engine

        engine = make_engine(os.environ["POOLAWARE_DSN"])

        @pytest.mark.parametrize("i", range(40))
        def test_db(i):
            with engine.connect() as conn:
                conn.execute(text("select 1"))
            assert i % 10 != 3
        """
    )
    result = run(pytester, "-n", "3", "--dist", "poolaware", *stop)
    assert result.ret in (pytest.ExitCode.TESTS_FAILED, pytest.ExitCode.INTERRUPTED)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) < 40
    role = psycopg.conninfo.conninfo_to_dict(role_dsn)["user"]
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        row = conn.execute(
            "select count(*) from pg_stat_activity where usename = %s", (role,)
        ).fetchone()
    assert row == (0,)


def test_a_test_bigger_than_the_budget_runs_alone_with_a_warning(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, limited_role: Any, log: Path
) -> None:
    monkeypatch.setenv("POOLAWARE_DSN", limited_role(20))
    pytester.makepyfile(
        """
        import os, pytest
        from sqlalchemy import text
        from pytest_poolaware.engine import make_engine

        engine = make_engine(os.environ["POOLAWARE_DSN"])

        def hold(n):
            conns = [engine.connect() for _ in range(n)]
            for conn in conns:
                conn.execute(text("select 1"))
            for conn in conns:
                conn.close()

        def test_huge():
            hold(6)

        @pytest.mark.parametrize("i", range(8))
        def test_small(i):
            hold(1)
        """
    )
    for _ in range(2):  # cold, then with the need known
        result = run(pytester, "-n", "3", "--dist", "poolaware", "--pool-budget", "4")
        result.assert_outcomes(passed=9)
        result.stdout.fnmatch_lines(["*test_huge*needed 6 connections*budget of 4*ran alone*"])


def test_corrupt_learned_data_is_ignored_with_a_warning(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_one():\n    pass\n")
    history = pytester.path / ".pytest_cache" / "d" / "poolaware" / "history.json"
    cases = {
        "{not json": "*learned data in*not valid JSON; starting cold*",
        json.dumps(
            {
                "schema": 1,
                "tests": {
                    "test_corrupt_learned_data_is_ignored_with_a_warning.py::test_one": [-1, "slow"]
                },
            }
        ): "*ignored 1 malformed entries in the learned data*",
        json.dumps(
            {"schema": 1, "tests": {"gone.py::test_old": [1, 0.5]}}
        ): "*forgot the learned data of 1 tests that no longer exist*",
        json.dumps([1, 2]): "*learned data in*history.json has an unknown format; starting cold*",
    }
    for garbage, warning in cases.items():
        history.parent.mkdir(parents=True, exist_ok=True)
        history.write_text(garbage)
        result = run(pytester, "-n", "2", "--dist", "poolaware")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([warning])


def test_unreachable_database_fails_tests_with_their_own_errors(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOLAWARE_DSN", "postgresql://nobody@127.0.0.1:9/none")
    pytester.makepyfile(
        """
        import os, pytest
        from sqlalchemy import text
        from pytest_poolaware.engine import make_engine

        engine = make_engine(os.environ["POOLAWARE_DSN"])

        @pytest.mark.parametrize("i", range(4))
        def test_db(i):
            with engine.connect() as conn:
                conn.execute(text("select 1"))

        def test_plain():
            pass
        """
    )
    result = run(pytester, "-n", "2", "--dist", "poolaware")
    result.assert_outcomes(passed=1, failed=4)
    result.stdout.fnmatch_lines(["*OperationalError*"])
    assert "INTERNALERROR" not in result.stdout.str()


@pytest.mark.parametrize("seed", range(6))
def test_random_mixes_report_every_test_exactly_once(
    pytester: pytest.Pytester, log: Path, seed: int
) -> None:
    """Seeded mixes of lanes, crashes and worker counts; every test reported once."""
    rng = random.Random(seed)
    lines = ["import os, pytest"]
    count = rng.randint(1, 40)
    crashes = 0
    for i in range(count):
        marker = rng.choice(["@pytest.mark.serial_only\n", "@pytest.mark.parallel_safe\n", ""])
        crash = rng.random() < 0.08
        crashes += crash
        body = "os._exit(3)" if crash else "pass"
        lines.append(f"{marker}def test_{i}():\n    {body}\n")
    pytester.makepyfile(test_mix="\n".join(lines))
    workers = str(rng.randint(1, 4))
    result = run(pytester, "-n", workers, "--dist", "poolaware", "-rA")
    outcomes = reported(result)
    assert sorted(outcomes) == sorted(f"test_mix.py::test_{i}" for i in range(count))
    assert list(outcomes.values()).count("FAILED") == crashes


def test_pytest_randomly_shuffles_but_nothing_is_lost(pytester: pytest.Pytester, log: Path) -> None:
    pytest.importorskip("pytest_randomly")
    pytester.makepyfile(test_crashy=CRASHY.format(serial_crash=-1, fan_crash=-1))
    result = pytester.runpytest_subprocess(
        "-n",
        "3",
        "--dist",
        "poolaware",
        "-p",
        "randomly",
        "--randomly-seed=1234",
        timeout=RUN_TIMEOUT,
    )
    result.assert_outcomes(passed=18)
    serial = sorted(
        (e for e in entries(log) if "test_serial" in e["nodeid"]), key=lambda e: e["start"]
    )
    assert len({e["worker"] for e in serial}) == 1
    for before, after in itertools.pairwise(serial):
        assert before["end"] <= after["start"]


def test_database_going_away_mid_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, limited_role: Any, postgres_dsn: str
) -> None:
    """A test kills every connection of the run's role; the others fail with their own
    errors (or reconnect), the scheduler neither hangs nor crashes."""
    monkeypatch.setenv("POOLAWARE_DSN", limited_role(12))
    monkeypatch.setenv("POOLAWARE_ADMIN_DSN", postgres_dsn)
    pytester.makepyfile(
        """
        import os, psycopg, pytest
        from sqlalchemy import text
        from pytest_poolaware.engine import make_engine

        engine = make_engine(os.environ["POOLAWARE_DSN"])

        @pytest.mark.parametrize("i", range(30))
        def test_db(i):
            with engine.connect() as conn:
                conn.execute(text("select pg_sleep(0.02)"))

        @pytest.mark.serial_only
        def test_kill_everything():
            user = psycopg.conninfo.conninfo_to_dict(os.environ["POOLAWARE_DSN"])["user"]
            with psycopg.connect(os.environ["POOLAWARE_ADMIN_DSN"], autocommit=True) as admin:
                admin.execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity where usename = %s",
                    (user,),
                )
        """
    )
    result = run(pytester, "-n", "3", "--dist", "poolaware", "-rA")
    outcomes = reported(result)
    assert len(outcomes) == 31
    assert outcomes["test_database_going_away_mid_run.py::test_kill_everything"] == "PASSED"
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_passwords_never_appear_in_the_output(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, postgres_dsn: str
) -> None:
    import poolaware_testserver as testserver

    secret = "s3cret-Pa55word"
    role = "poolaware_secret_role"
    dsn = testserver.create_role(postgres_dsn, role, connection_limit=10, password=secret)
    try:
        monkeypatch.setenv("POOLAWARE_DSN", dsn)
        pytester.makepyfile(
            """
            import os
            from sqlalchemy import text
            from pytest_poolaware.engine import make_engine

            engine = make_engine(os.environ["POOLAWARE_DSN"])

            def test_db():
                with engine.connect() as conn:
                    conn.execute(text("select 1"))

            def test_fails_on_the_server():
                with engine.connect() as conn:
                    conn.execute(text("select * from no_such_table"))
            """
        )
        result = run(pytester, "-n", "2", "--dist", "poolaware", "-v", "-rA")
        result.assert_outcomes(passed=1, failed=1)
        assert secret not in result.stdout.str() + result.stderr.str()
    finally:
        testserver.drop_role(postgres_dsn, role)


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


#: How often wait_for looks again.
POLL_INTERVAL = 0.05


def test_ctrl_c_stops_the_run_and_leaves_nothing_behind(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, limited_role: Any, postgres_dsn: str
) -> None:
    role_dsn = limited_role(10)
    monkeypatch.setenv("POOLAWARE_DSN", role_dsn)
    started = pytester.path / "started"
    monkeypatch.setenv("POOLAWARE_STARTED", str(started))
    pytester.makepyfile(
        """
        import os, pathlib, pytest
        from sqlalchemy import text
        from pytest_poolaware.engine import make_engine

        engine = make_engine(os.environ["POOLAWARE_DSN"])

        @pytest.mark.parametrize("i", range(200))
        def test_slow(i):
            with engine.connect() as conn:
                pathlib.Path(os.environ["POOLAWARE_STARTED"]).touch()
                conn.execute(text("select pg_sleep(0.2)"))
        """
    )
    args = [sys.executable, "-m", "pytest", "-n", "3", "--dist", "poolaware", "-p", "no:randomly"]
    process = subprocess.Popen(
        args,
        cwd=pytester.path,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_for(started.exists, RUN_TIMEOUT)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends: the whole process group
        output, _ = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == pytest.ExitCode.INTERRUPTED, output.decode()[-2000:]
    assert wait_for(lambda: not _group_alive(process.pid), RUN_TIMEOUT)
    role = psycopg.conninfo.conninfo_to_dict(role_dsn)["user"]

    def role_connections() -> int:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            row = conn.execute(
                "select count(*) from pg_stat_activity where usename = %s", (role,)
            ).fetchone()
        return int(row[0]) if row else -1

    # The server notices closed sockets at once, but its backends take a moment to exit.
    assert wait_for(lambda: role_connections() == 0, RUN_TIMEOUT)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


BROAD_FIXTURE = """
import os
import psycopg
import pytest

@pytest.fixture(scope="session")
def database():
    with open(os.environ["SETUP_LOG"], "a") as log:
        log.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
    with psycopg.connect(os.environ["NO_ROOM_DSN"]) as conn:  # CONNECTION LIMIT 0
        yield conn

@pytest.mark.parametrize("i", range(6))
def test_uses_it(database, i):
    pass

@pytest.mark.parametrize("i", range(4))
def test_plain(i):
    pass
"""


def test_a_session_fixture_failing_on_a_connection_limit_is_said_once_and_not_rerun(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    limited_role: Callable[[int], str],
    postgres_dsn: str,
) -> None:
    """Rerunning its tests one by one cannot help (each would fail on the fixture's
    cached error, or repeat the session's setup): the outcomes are load's, no test is
    rerun, the setup runs once per worker, and one line says why."""
    setups = pytester.path / "setups.txt"
    monkeypatch.setenv("SETUP_LOG", str(setups))
    monkeypatch.setenv("NO_ROOM_DSN", limited_role(0))
    monkeypatch.setenv("POOLAWARE_DSN", postgres_dsn)
    pytester.makepyfile(test_broad=BROAD_FIXTURE)
    outcomes = {}
    for dist in ("load", "poolaware"):
        setups.unlink(missing_ok=True)
        result = run(pytester, "-n", "2", "--dist", dist, "-rA")
        result.assert_outcomes(passed=4, errors=6)
        outcomes[dist] = reported(result)
        ran = setups.read_text().splitlines()
        assert len(ran) == len(set(ran)), ran  # once per worker, never repeated
    assert outcomes["poolaware"] == outcomes["load"]
    assert "rerun alone (" not in result.stdout.str()  # the summary's rerun lines
    said = [line for line in result.stdout.lines if "failed on a connection limit" in line]
    assert len(said) == 1, said
    assert "session-scoped fixture 'database'" in said[0]
