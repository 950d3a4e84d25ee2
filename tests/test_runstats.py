"""The run as plain data (``reporting.runstats``): wall, top needs, the JSON report, the
connections the workers did not count. Pure."""

from __future__ import annotations

import json

from runfacts import facts

from pytest_poolaware.reporting.runstats import ItemFacts, RunStats, uncounted


def test_run_stats_wall_top_needs_and_json() -> None:
    items = (
        facts("a.py::test_a", need=3, duration=2.0),
        ItemFacts("a.py::test_b", start=5.0, end=6.5, duration=1.5, need=7),
        facts("a.py::test_c", need=None),
        facts("a.py::test_d", need=0, serial=True),
    )
    stats = RunStats(
        budget=10,
        budget_source="--pool-budget",
        workers=2,
        items=items,
        peak_open=8,
        started=-1.0,
        finished=9.0,
    )
    assert stats.wall == 6.5  # first start 0.0, last end 6.5
    assert stats.session == 10.0
    assert [i.nodeid for i in stats.top_needs(5)] == ["a.py::test_b", "a.py::test_a"]
    data = stats.to_json()
    assert [t["nodeid"] for t in data["tests"]] == [i.nodeid for i in items]
    assert data["tests"][2]["need"] is None
    assert data["run"]["lanes"]["fanout"] == {
        "items": 2,
        "running": 3.5,
        "waited": 0.0,
        "go_wait": 0.0,
        "gate_wait": 0.0,
    }
    assert data["run"]["peak_open_server"] is None
    # serial 1.0; longest 2.0; workers (1.0 + 3.5) / 2; budget (6 + 10.5) / 10; no conflict
    assert data["run"]["lower_bound"] == {
        "value": 2.25,
        "binding": "workers",
        "serial": 1.0,
        "longest": 2.0,
        "workers": 2.25,
        "connections": 1.65,
        "conflicts": 1.0,
        "budget": 10,
    }
    json.dumps(data)


def test_uncounted_connections_are_the_lasting_excess_of_the_server_over_the_workers() -> None:
    workers = [(0.0, "gw0", 2), (0.5, "gw1", 1), (2.0, "gw0", 0), (2.0, "gw1", 0)]
    # 0.1-0.2: one in flight (too short to report); 1.0-1.6: one more, held (a blind spot).
    server = [(0.1, 3), (0.2, 2), (0.6, 3), (1.0, 4), (1.3, 4), (1.6, 4), (1.9, 3), (2.5, 0)]
    seen = uncounted(workers, server, hold=0.25)
    assert (seen.most, seen.end_server, seen.end_workers) == (1, 0, 0)
    assert uncounted(workers, server[:2], hold=0.25).most == 0
