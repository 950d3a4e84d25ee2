"""The summary stays true and short whatever the suite's size: warnings grouped by cause
(``findings``), the other logins' rooms (``login_rooms``), and the whole section's length
(advice thresholds: test_advice.py). Pure: no xdist, no database."""

from __future__ import annotations

from typing import cast

import pytest

from pytest_poolaware.planning.admission import Admission, AdmissionAction, Go, Overrun
from pytest_poolaware.reporting.advice import advise, withheld
from pytest_poolaware.reporting.findings import (
    Cause,
    Stall,
    cause_of,
    overrun_warnings,
    rerun_lines,
    stall_warnings,
    why,
)
from pytest_poolaware.reporting.report import write_summary
from pytest_poolaware.reporting.runstats import ItemFacts, RunStats
from pytest_poolaware.server.login_rooms import OtherLogins
from pytest_poolaware.server.room import ServerFacts
from pytest_poolaware.shared.settings import Settings

#: As in the real suite that flooded the summary: 1,750 tests, a budget of 3.
SUITE_SIZE = 1750
BUDGET = 3


def names(count: int) -> list[str]:
    return [f"hc/api/tests/test_{n // 10}.py::Tests::test_{n}" for n in range(count)]


def kept_open(index: int, *, workers: int = 4, budget: int = BUDGET) -> Overrun:
    """An item of need 1 let past the budget while every worker kept one connection open
    between tests (a persistent connection, as Django's)."""
    return Overrun(index, 1, budget, False, outside=(1,) * workers)


def test_an_overrun_of_workers_keeping_connections_open_says_so() -> None:
    overrun = kept_open(0)
    assert cause_of(overrun) is Cause.KEPT_OPEN
    assert why(overrun) == "4 workers each keep a connection open between tests; the budget is 3"
    assert why(Overrun(0, 1, 3, False, outside=(2, 1))) == (
        "2 workers keep 3 connections open between tests; the budget is 3"
    )
    assert why(Overrun(0, 2, 3, False, outside=(2,))) == (
        "a worker keeps 2 connections open between tests; the budget is 3"
    )
    assert cause_of(Overrun(0, 5, 3, True)) is Cause.TOO_BIG
    assert cause_of(Overrun(0, 2, 3, False, in_tests=2)) is Cause.CROWDED


def test_hundreds_of_overruns_of_one_cause_are_one_line_with_the_count_and_the_cause() -> None:
    nodeids = names(688)
    overruns = [kept_open(i) for i in range(688)]
    lines = overrun_warnings(overruns, lambda o: nodeids[o.index])
    assert lines == [
        "WARNING: 688 tests ran past the budget: 4 workers each keep a connection open between "
        f"tests; the budget is 3 ({nodeids[0]}, {nodeids[1]}, {nodeids[2]} and 685 more; "
        "-v lists them)"
    ]
    assert "needed 1 connections" not in lines[0]
    verbose = overrun_warnings(overruns, lambda o: nodeids[o.index], verbose=True)
    assert verbose[0] == lines[0]
    assert verbose[1:] == [f"  {nodeid}: {why(kept_open(0))}" for nodeid in nodeids]


def test_each_cause_gets_its_own_line_and_a_single_test_keeps_its_own_words() -> None:
    overruns = [
        Overrun(0, 6, 4, True),
        kept_open(1),
        kept_open(2),
        Overrun(3, 2, 3, False, in_tests=2),
        Overrun(4, 5, 4, False),
    ]
    lines = overrun_warnings(overruns, lambda o: f"t.py::test_{o.index}")
    assert lines == [
        "WARNING: 2 tests needed more connections at once than the whole budget of 4: "
        "t.py::test_0 (6), t.py::test_4 (5); 1 of them ran beside other tests",
        "WARNING: 2 tests ran past the budget: 4 workers each keep a connection open between "
        "tests; the budget is 3 (t.py::test_1, t.py::test_2)",
        "WARNING: t.py::test_3 ran past the budget of 3: the other tests held the rest of it "
        "and none could end first",
    ]
    alone = overrun_warnings([Overrun(0, 6, 4, True)], lambda o: "t.py::test_huge")
    assert alone == [
        "WARNING: t.py::test_huge needed 6 connections, more than the whole budget of 4; "
        "it ran alone"
    ]


def test_reruns_are_one_line_per_reason() -> None:
    reruns = [(f"t.py::test_{n}", "connection limit") for n in range(40)]
    reruns.append(("t.py::test_other", "gave way"))
    assert rerun_lines(reruns) == [
        "rerun alone (connection limit): 40 tests: t.py::test_0, t.py::test_1, t.py::test_2 "
        "and 37 more (-v lists them)",
        "rerun alone (gave way): t.py::test_other",
    ]
    assert len(rerun_lines(reruns, verbose=True)) == 1 + 40 + 1


class Terminal:
    """What ``write_summary`` uses of pytest's terminal reporter."""

    def __init__(self, verbose: int) -> None:
        self.config = type("Config", (), {"option": type("Option", (), {"verbose": verbose})})
        self.lines: list[str] = []

    def write_sep(self, sep: str, title: str) -> None:
        self.lines.append(f"--- {title} ---")

    def write_line(self, line: str) -> None:
        self.lines.append(line)


def big_run(size: int = SUITE_SIZE, *, troubles: bool = False) -> RunStats:
    """A real suite's shape: most tests touch the database once, a third twice, a third
    let past a budget of 3 by persistent connections, the logins' notes; with
    ``troubles``, reruns, leaks and more notes too."""
    nodeids = names(size)
    items = [
        ItemFacts(
            nodeid,
            need=2 if n % 3 == 0 else 1,
            duration=0.05,
            peak_open=1,
            waited=0.0,
            worker=f"gw{n % 4}",
            start=float(n),
            end=n + 0.05,
            rerun="connection limit" if troubles and n % 50 == 0 else "",
            leaks=1 if troubles and n % 100 == 0 else 0,
        )
        for n, nodeid in enumerate(nodeids)
    ]
    settings = Settings(budget=BUDGET, budget_source="role hcapp CONNECTION LIMIT 5")
    risky = settings.serial_advice_need
    advice = advise(items, risky_need=risky, idle_need=0)
    return RunStats(
        budget=BUDGET,
        budget_source=settings.budget_source,
        workers=4,
        items=tuple(items),
        peak_open=4,
        started=0.0,
        finished=float(size),
        overruns=tuple(kept_open(n) for n in range(0, size, 3)),
        notes=tuple(f"note number {n}" for n in range(8 if troubles else 2)),
        advice=tuple(advice),
        advice_withheld=withheld(items, advice, risky_need=risky, budget=BUDGET),
    )


def summary(stats: RunStats, verbose: int) -> list[str]:
    terminal = Terminal(verbose)
    settings = Settings(budget=BUDGET, budget_source=stats.budget_source)
    write_summary(cast("pytest.TerminalReporter", terminal), stats, settings, [])
    return terminal.lines[1:]


def test_the_summary_of_a_large_suite_stays_short_and_verbose_carries_the_rest() -> None:
    stats = big_run()
    lines = summary(stats, 0)
    assert len(lines) <= 16, "\n".join(lines)
    assert sum(1 for line in lines if line.startswith("WARNING")) == 1
    assert not any("serial_only candidate" in line for line in lines)
    assert any(
        line.startswith("marker advice: no serial_only advice: 584 of 1750") for line in lines
    )
    full = summary(stats, 1)
    assert len(full) > SUITE_SIZE // 3  # every overrun with -v
    assert stats.to_json()["run"]["advice_withheld"] == stats.advice_withheld
    assert len(stats.to_json()["run"]["overruns"]) == len(stats.overruns)


def test_the_summary_s_length_does_not_grow_with_the_suite() -> None:
    lines = summary(big_run(troubles=True), 0)
    assert len(summary(big_run(10 * SUITE_SIZE, troubles=True), 0)) == len(lines)
    assert any(line.startswith("rerun alone (connection limit): 35 tests:") for line in lines)
    assert "note: 5 more notes (-v shows them all)" in lines
    full = summary(big_run(troubles=True), 1)
    assert "note: note number 7" in full
    assert sum(1 for line in full if line.startswith("  hc/")) > 35  # reruns, overruns


def test_connects_kept_waiting_with_room_are_a_fault_one_line_per_cause() -> None:
    """Four workers' connects held 30 s while the server was read, one read late: two
    warning lines that say it was a fault and why, never a wait for the budget; the JSON
    report lists each with its test."""
    read = "the server's room was being read, from the first connection opened"
    late = "the controller read the request 2.0s after it came (its main thread was busy)"
    stalls = [Stall(f"gw{n}", n, 30.0 + n / 10, read, gave_up=True) for n in range(4)]
    stalls.append(Stall("gw1", -1, 2.0, late))
    nodeids = names(10)
    assert stall_warnings(stalls, nodeids.__getitem__) == [
        "WARNING: fault: 4 connects waited at the gate up to 30.3s though the budget had "
        f"room (gw0 {nodeids[0]}, gw1 {nodeids[1]}, gw2 {nodeids[2]} and 1 more (-v lists "
        f"them)): {read}",
        "WARNING: fault: a connect waited at the gate up to 2.0s though the budget had room "
        f"(gw1 outside tests): {late}",
    ]
    assert len(stall_warnings(stalls, nodeids.__getitem__, verbose=True)) == 2 + 4
    stats = big_run(10)
    stats = RunStats(**{**stats.__dict__, "stalls": tuple(stalls)})
    lines = summary(stats, 0)
    assert sum(1 for line in lines if line.startswith("WARNING: fault: ")) == 2
    assert not any("for connection budget" in line for line in lines)
    listed = stats.to_json()["run"]["stalls"]
    assert listed[0] == {
        "worker": "gw0",
        "nodeid": nodeids[0],
        "waited": 30.0,
        "cause": read,
        "gave_up": True,
    }
    assert listed[4]["nodeid"] is None  # outside any test


def decide(admission: Admission[str]) -> list[AdmissionAction]:
    actions: list[AdmissionAction] = []
    admission.admit(actions)
    return actions


def test_an_overrun_records_the_connections_workers_keep_between_tests() -> None:
    """Four workers each keep a connection open between tests (nothing can free it), the
    budget is 3: the next item is let past the budget, and the overrun says why."""
    admission: Admission[str] = Admission(BUDGET, need_of=lambda index: 1)
    for worker in ("gw0", "gw1", "gw2", "gw3"):
        admission.add_worker(worker)
        admission.counts(worker, 1, 0)
    admission.queued("gw0", [0])
    assert [a for a in decide(admission) if isinstance(a, Go)] == [Go("gw0", 0)]
    [overrun] = admission.overruns
    assert (overrun.need, overrun.budget, overrun.outside, overrun.in_tests) == (
        1,
        BUDGET,
        (1, 1, 1, 1),
        0,
    )
    assert cause_of(overrun) is Cause.KEPT_OPEN


def facts(role_clients: tuple[int, ...], database: str) -> ServerFacts:
    clients = tuple((pid, "app", database, False) for pid in role_clients)
    return ServerFacts(
        version=150000,
        max_connections=100,
        superuser_reserved=3,
        reserved=0,
        role="app",
        superuser=False,
        uses_reserved=False,
        role_limit=5,
        database=database,
        database_limit=-1,
        others_server=len(clients),
        others_role=len(clients),
        others_database=len(clients),
        own_in_role=True,
        clients=clients,
    )


def test_the_run_s_own_backends_are_not_other_clients_and_every_login_is_counted() -> None:
    logins = OtherLogins()
    # Read while two workers' connections were open that they had not reported yet.
    logins.add("app@db:5432/test_app_gw0", facts((11, 12), "test_app_gw0"))
    binding = logins.bind(None, runs=[10])
    assert binding is not None
    assert binding.room.describe().startswith("role app CONNECTION LIMIT 5, 2 held by other")
    # Once they are known to be the run's, the room is counted again without them.
    for n in (1, 2, 3):
        logins.add(f"app@db:5432/test_app_gw{n}", facts((), f"test_app_gw{n}"))
    binding = logins.bind(None, runs=[10, 11, 12])
    assert binding is not None
    assert binding.choice.budget == 4
    assert "held by other clients" not in binding.room.describe()
    assert logins.notes() == [
        "tests also connected as 4 logins (app@db:5432/test_app_gw0, app@db:5432/test_app_gw1, "
        "app@db:5432/test_app_gw2 and 1 more): room 4 (role app CONNECTION LIMIT 5, 1 kept for "
        "the monitor)"
    ]


def test_connections_the_workers_counted_beyond_their_reported_pids_are_the_run_s_own() -> None:
    """A worker reports the pid of its first connection per login only: the server may
    list more of the run's connections than the pids known, as many as the workers
    counted open beyond those; the rest are other clients'."""
    logins = OtherLogins()
    # Known: 10. Unknown: 11 and 12 (the run's: its workers counted 3 open), 13 (another
    # client's).
    logins.add("app@db:5432/test_app_gw0", facts((10, 11, 12, 13), "test_app_gw0"), run_open=3)
    binding = logins.bind(None, runs=[10])
    assert binding is not None
    assert binding.room.others == 1
    assert binding.choice.budget == 3
    assert "1 held by other clients" in binding.room.describe()
