"""The serial lane's worker keeps its CPU priority; the fan-out workers lower theirs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from inner import run

from pytest_poolaware.planning.priority import (
    ENV_WORKER_NICE,
    offer_to_workers,
    take_in_worker,
    withdraw,
)


@pytest.mark.parametrize(
    ("env", "niceness"),
    [
        ({ENV_WORKER_NICE: "5", "PYTEST_XDIST_WORKER": "gw1"}, 5),
        ({ENV_WORKER_NICE: "5"}, 0),  # not a worker
        ({ENV_WORKER_NICE: "lots", "PYTEST_XDIST_WORKER": "gw1"}, 0),
        ({"PYTEST_XDIST_WORKER": "gw1"}, 0),  # not a poolaware run
    ],
)
def test_a_worker_takes_the_offer_out_of_its_environment(
    env: dict[str, str], niceness: int
) -> None:
    assert take_in_worker(env) == niceness
    assert ENV_WORKER_NICE not in env  # a nested pytest run started by a test never sees it


def test_the_controller_offers_only_a_positive_niceness_and_withdraws_it() -> None:
    env: dict[str, str] = {}
    offer_to_workers(0, env)
    assert env == {}
    offer_to_workers(5, env)
    assert env == {ENV_WORKER_NICE: "5"}
    withdraw(env)
    assert env == {}


#: Each test notes its worker, that worker's niceness and whether the offer leaked.
NICENESS_TESTS = """
import json, os, pytest

def note(name):
    entry = {
        "test": name,
        "worker": os.environ["PYTEST_XDIST_WORKER"],
        "nice": os.nice(0),
        "leaked": "POOLAWARE_WORKER_NICE" in os.environ,
    }
    with open(os.environ["NICENESS_LOG"], "a") as log:
        log.write(json.dumps(entry) + "\\n")

@pytest.mark.serial_only
@pytest.mark.parametrize("i", range(3))
def test_serial(i):
    note("serial")

@pytest.mark.parametrize("i", range(30))
def test_fan(i):
    note("fan")
"""


def niceness_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str
) -> list[dict[str, object]]:
    log = pytester.path / "niceness.jsonl"
    monkeypatch.setenv("NICENESS_LOG", str(log))
    pytester.makepyfile(test_nice=NICENESS_TESTS)
    run(pytester, *args).assert_outcomes(passed=33)
    return [json.loads(line) for line in Path(log).read_text().splitlines()]


@pytest.mark.parametrize(
    ("workers", "first"),
    [
        (("-n", "3"), "gw0"),
        (("--tx", "popen//id=alpha", "--tx", "popen//id=beta", "--tx", "popen//id=gamma"), "alpha"),
    ],
    ids=["numbered", "named"],
)
def test_fanout_workers_run_at_a_lower_priority_than_the_serial_lanes(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    workers: tuple[str, ...],
    first: str,
) -> None:
    """The first worker spawned keeps its priority and runs the serial lane."""
    base = os.nice(0)
    notes = niceness_run(pytester, monkeypatch, *workers, "--dist", "poolaware")
    assert {n["worker"] for n in notes if n["test"] == "serial"} == {first}
    niceness = {n["worker"]: n["nice"] for n in notes}
    assert niceness.pop(first) == base
    assert niceness  # the fan-out ran on other workers too
    assert set(niceness.values()) == {min(base + 5, 19)}
    assert not any(n["leaked"] for n in notes)


@pytest.mark.parametrize(
    "args",
    [("--dist", "poolaware", "--poolaware-fanout-nice", "0"), ("--dist", "load")],
    ids=["turned-off", "not-poolaware"],
)
def test_every_worker_keeps_its_priority_otherwise(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    base = os.nice(0)
    notes = niceness_run(pytester, monkeypatch, "-n", "3", *args)
    assert {n["nice"] for n in notes} == {base}
