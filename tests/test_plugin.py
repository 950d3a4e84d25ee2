"""What a user sees from the plugin's options, markers and configuration errors."""

from __future__ import annotations

import pytest
from inner import TWO_TESTS, run

from pytest_poolaware.shared.settings import (
    BUDGET,
    GATE_TIMEOUT,
    OPTIONS,
    ConfigError,
    PoolSettings,
    Settings,
)


def test_dist_poolaware_is_listed_in_help(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--help")
    result.stdout.fnmatch_lines(["*poolaware: serial_only tests one at a time*"])
    result.stdout.fnmatch_lines(["*--pool-budget=N*"])


def test_markers_are_registered_for_strict_markers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TWO_TESTS)
    result = run(pytester, "--strict-markers", "-m", "serial_only", "-v")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["*test_heavy PASSED*"])


def test_works_without_xdist(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TWO_TESTS)
    result = run(pytester, "-p", "no:xdist", "--strict-markers", "-m", "parallel_safe")
    result.assert_outcomes(passed=1, deselected=1)


def test_dist_poolaware_from_addopts(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\naddopts = -n 2 --dist poolaware\n")
    pytester.makepyfile(TWO_TESTS)
    result = run(pytester)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["budget: * connections (*)"])


def test_both_markers_is_a_usage_error_naming_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.serial_only
        @pytest.mark.parallel_safe
        def test_confused():
            pass
        """
    )
    result = run(pytester, "-n", "2", "--dist", "poolaware")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*marked both serial_only and parallel_safe*test_confused*"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--pool-budget", "0"], {}, "*--pool-budget*positive integer*'0'*"),
        (["--pool-budget", "-3"], {}, "*--pool-budget*positive integer*'-3'*"),
        (["--pool-budget", "lots"], {}, "*--pool-budget*'lots'*"),
        ([], {"PG_POOL_SIZE": "ten"}, "*PG_POOL_SIZE='ten'*positive integer*"),
        ([], {"PG_MAX_OVERFLOW": "-1"}, "*PG_MAX_OVERFLOW='-1'*non-negative integer*"),
        ([], {"PG_POOL_TIMEOUT": "soon"}, "*PG_POOL_TIMEOUT='soon'*seconds*"),
        (["--poolaware-unmarked", "sometimes"], {}, "*--poolaware-unmarked*'sometimes'*"),
        (["--poolaware-order", "sideways"], {}, "*--poolaware-order*collection*'sideways'*"),
        (["--poolaware-fanout-nice", "-1"], {}, "*--poolaware-fanout-nice*non-negative*'-1'*"),
        (["--poolaware-fast-exit", "maybe"], {}, "*--poolaware-fast-exit*true or false*'maybe'*"),
        (
            ["--poolaware-history", "nowhere/h.json", "--poolaware-store-history"],
            {},
            "*--poolaware-store-history*--poolaware-history 'nowhere/h.json'*does not exist*",
        ),
    ],
)
def test_bad_settings_are_usage_errors(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile(TWO_TESTS)
    result = run(pytester, "-n", "2", "--dist", "poolaware", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str()


@pytest.mark.parametrize(
    ("ini", "message"),
    [
        ("poolaware_budget = 1.5", "*poolaware_budget='1.5'*positive integer*"),
        ("poolaware_fast_exit = sometimes", "*poolaware_fast_exit='sometimes'*true or false*"),
        ("poolaware_order = random", "*poolaware_order='random'*collection, duration*"),
    ],
)
def test_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester, ini: str, message: str) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(TWO_TESTS)
    result = run(pytester, "-n", "2", "--dist", "poolaware")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str()


def test_settings_precedence(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Option over ini over environment; the source is named for the summary."""
    monkeypatch.setenv("PG_POOL_SIZE", "4")
    monkeypatch.setenv("PG_MAX_OVERFLOW", "3")
    config = pytester.parseconfig()
    assert (Settings.from_config(config).budget, PoolSettings.from_env().max_connections) == (
        7,
        7,
    )
    pytester.makeini("[pytest]\npoolaware_budget = 9\n")
    config = pytester.parseconfig()
    assert Settings.from_config(config).budget == 9
    config = pytester.parseconfig("--pool-budget", "5")
    settings = Settings.from_config(config)
    assert (settings.budget, settings.budget_source) == (5, "--pool-budget")


def test_settings_know_the_workers(pytester: pytest.Pytester) -> None:
    """``-n`` within ``--maxprocesses`` (sharing keeps no slot for another run's arrival
    when it would leave the workers less than one connection each); 0 when unknown."""
    assert Settings.from_config(pytester.parseconfig("-n", "3")).workers == 3
    assert Settings.from_config(pytester.parseconfig("-n", "4", "--maxprocesses", "2")).workers == 2
    assert Settings.from_config(pytester.parseconfig()).workers == 0


#: An inner conftest leaving, in every process of the run, an object in a reference cycle
#: alive at exit; its ``__del__`` (run only by a garbage collection) leaves a file behind.
EXIT_WITNESS_CONFTEST = """
import os

class ExitWitness:
    def __init__(self, path):
        self.path = path
        self.cycle = self
        self.open = open

    def __del__(self):
        with self.open(self.path, "w") as file:
            file.write("collected")

def pytest_configure(config):
    name = os.environ.get("PYTEST_XDIST_WORKER", "controller")
    global WITNESS
    WITNESS = ExitWitness(os.path.join(os.environ["WITNESS_DIR"], name))
"""


@pytest.mark.parametrize(
    ("args", "collected_at_exit"),
    [
        (["--dist", "poolaware"], []),
        (["--dist", "poolaware", "--poolaware-fast-exit", "false"], ["controller", "gw0", "gw1"]),
        (["--dist", "load"], ["controller", "gw0", "gw1"]),
    ],
)
def test_fast_exit_skips_the_final_collections_of_every_process(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    collected_at_exit: list[str],
) -> None:
    """Only a poolaware run exits without collecting (the controller waits for every
    worker's exit), and ``--poolaware-fast-exit false`` gives the interpreter's own back."""
    witnesses = pytester.mkdir("witnesses")
    monkeypatch.setenv("WITNESS_DIR", str(witnesses))
    pytester.makeconftest(EXIT_WITNESS_CONFTEST)
    pytester.makepyfile(TWO_TESTS)
    result = run(pytester, "-n", "2", *args)
    result.assert_outcomes(passed=2)
    assert sorted(path.name for path in witnesses.iterdir()) == collected_at_exit


def test_every_option_is_registered_from_the_table(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfig()
    for option in OPTIONS:
        assert config.getoption(option.dest) is None, option.flag
        if option.ini is not None:
            assert config.getini(option.ini) == "", option.ini
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines([f"*{option.flag}*" for option in OPTIONS])
    result.stdout.fnmatch_lines([f"*{option.ini}*" for option in OPTIONS if option.ini])


def test_option_over_ini_over_environment(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PG_POOL_TIMEOUT", "7")
    monkeypatch.setenv("POOLAWARE_DSN", "postgresql://app@db/env")
    settings = Settings.from_config(pytester.parseconfig())
    assert settings.gate_timeout == 7.0
    assert (settings.monitor_dsn, settings.monitor_source) == (
        "postgresql://app@db/env",
        "$POOLAWARE_DSN",
    )
    assert settings.tests_dsn == ""  # the plugin's connection is the tests' login
    pytester.makeini(
        "[pytest]\npoolaware_gate_timeout = 5\npoolaware_monitor = postgresql://app@db/ini\n"
    )
    settings = Settings.from_config(pytester.parseconfig())
    assert settings.gate_timeout == 5.0
    assert (settings.monitor_dsn, settings.monitor_source) == (
        "postgresql://app@db/ini",
        "ini poolaware_monitor",
    )
    # Given elsewhere: $POOLAWARE_DSN is the tests' login, whose room is read too.
    assert settings.tests_dsn == "postgresql://app@db/env"
    config = pytester.parseconfig("--poolaware-gate-timeout", "3", "--poolaware-monitor", "off")
    settings = Settings.from_config(config)
    assert settings.gate_timeout == 3.0
    assert (settings.monitor_dsn, settings.monitor_source) == ("", "--poolaware-monitor")
    assert settings.tests_dsn == ""
    assert GATE_TIMEOUT.resolve(config) == (3.0, "--poolaware-gate-timeout")
    assert BUDGET.resolve(config) is None  # none of the three: the pools' sizes decide


@pytest.mark.parametrize(
    ("ini", "env", "message"),
    [
        ("", {"PG_POOL_TIMEOUT": "-2"}, "PG_POOL_TIMEOUT='-2': expected a positive number"),
        ("poolaware_unknown_need = x", {}, "poolaware_unknown_need='x': expected a non-negative"),
        ("poolaware_unmarked = both", {}, "poolaware_unmarked='both': expected one of"),
        (
            "poolaware_monitor = mysql://u:s3cret@db/x",
            {},
            "poolaware_monitor: expected a PostgreSQL DSN or 'off', got 'mysql://u:***@db/x'",
        ),
    ],
)
def test_ini_and_environment_errors_name_the_key_and_value(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    ini: str,
    env: dict[str, str],
    message: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_config(pytester.parseconfig())
    assert str(excinfo.value).startswith(message)
    assert "s3cret" not in str(excinfo.value)


def test_the_history_file_is_found_where_its_setting_was_given(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An option's path is relative to where pytest runs, an ini key's to the ini file."""
    pytester.makeini("[pytest]\npoolaware_history = ci/history.json\n")
    below = pytester.mkdir("below")
    monkeypatch.chdir(below)
    settings = Settings.from_config(pytester.parseconfig())
    assert settings.history_path == str(pytester.path / "ci" / "history.json")
    assert not settings.store_history
    config = pytester.parseconfig("--poolaware-history=h.json", "--poolaware-store-history")
    settings = Settings.from_config(config)
    assert (settings.history_path, settings.store_history) == (str(below / "h.json"), True)


@pytest.mark.parametrize(
    ("ini", "args", "message"),
    [
        ("", [], "--poolaware-store-history needs a file to write: give --poolaware-history="),
        (
            "",
            ["--poolaware-history=gone/h.json"],
            "--poolaware-store-history cannot write the learned data to --poolaware-history "
            "'gone/h.json': its directory ",
        ),
        (
            "poolaware_history = adir",
            [],
            "--poolaware-store-history cannot write the learned data to ini poolaware_history "
            "'adir': it is a directory",
        ),
    ],
)
def test_storing_the_history_needs_a_file_it_can_write(
    pytester: pytest.Pytester, ini: str, args: list[str], message: str
) -> None:
    pytester.mkdir("adir")
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    config = pytester.parseconfig(*args, "--poolaware-store-history")
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_config(config)
    assert str(excinfo.value).startswith(message)
