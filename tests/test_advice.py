"""Marker advice (``reporting.advice``): who is a candidate for which marker, from which
threshold, when it is withheld, and the advice file pointing at each definition. Pure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runfacts import facts

from pytest_poolaware.reporting.advice import advice_text, advise, definition, locate, withheld
from pytest_poolaware.reporting.runstats import Candidate, ItemFacts
from pytest_poolaware.shared.markers import Markers
from pytest_poolaware.shared.settings import Settings, default_risky_need


def test_advice_rules() -> None:
    items = [
        facts("t.py::test_heavy[1]", need=2),
        facts("t.py::test_heavy[2]", need=8),
        facts("t.py::test_at_threshold", need=5),
        facts("t.py::test_below", need=4),
        facts("t.py::test_marked_parallel", need=9, parallel=True),
        facts("t.py::test_not_run", need=None),
        facts("t.py::test_serial_idle", need=0, serial=True),
        facts("t.py::test_serial_db", need=1, serial=True),
        facts("t.py::test_serial_mixed[a]", need=0, serial=True),
        facts("t.py::test_serial_mixed[b]", need=2, serial=True),
        facts("t.py::test_serial_unmeasured", need=None, serial=True),
        facts("t.py::TestAllIdle::test_one", need=0, serial=True),
        facts("t.py::TestAllIdle::test_two[x]", need=0, serial=True),
        facts("t.py::TestSome::test_one", need=0, serial=True),
        facts("t.py::TestSome::test_two", need=3, serial=True),
    ]
    advice = advise(items, risky_need=5, idle_need=0)
    assert [(c.marker, c.target, c.need, c.tests) for c in advice] == [
        ("serial_only", "t.py::test_heavy", 8, 2),
        ("serial_only", "t.py::test_at_threshold", 5, 1),
        ("parallel_safe", "t.py::test_serial_idle", 0, 1),
        ("parallel_safe", "t.py::TestAllIdle", 0, 2),
        ("parallel_safe", "t.py::TestSome::test_one", 0, 1),
    ]
    relaxed = advise(items, risky_need=100, idle_need=1)
    assert "t.py::test_serial_db" in [c.target for c in relaxed]
    assert default_risky_need(15) == 8
    assert default_risky_need(1) == 2  # never from one connection
    assert definition("d/t.py::TestA::test_b[x::y-1]") == "d/t.py::TestA::test_b"


def test_advice_file_points_at_definitions(tmp_path: Path) -> None:
    source = (
        "import pytest\n\n"
        "class TestA:\n"
        "    @pytest.mark.serial_only\n"
        "    def test_b(self):\n"
        "        pass\n\n"
        "async def test_c():\n"
        "    pass\n"
    )
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "test_x.py").write_text(source)
    assert locate(tmp_path, "pkg/test_x.py::TestA::test_b") == 5
    assert locate(tmp_path, "pkg/test_x.py::TestA") == 3
    assert locate(tmp_path, "pkg/test_x.py::test_c") == 8
    assert locate(tmp_path, "pkg/test_x.py::test_gone") is None
    assert locate(tmp_path, "pkg/missing.py::test_c") is None
    text = advice_text(
        [
            Candidate("parallel_safe", "pkg/test_x.py::TestA::test_b", 0, 1, "why"),
            Candidate("serial_only", "pkg/test_x.py::test_gone", 9, 1, "heavy"),
        ],
        root=tmp_path,
        shown_from=tmp_path / "pkg",
        budget=15,
        risky_need=8,
        idle_need=0,
    )
    assert text.splitlines()[-2:] == [
        "test_x.py:5: @pytest.mark.parallel_safe (instead of serial_only)  # TestA::test_b: why",
        "test_x.py: @pytest.mark.serial_only  # test_gone: heavy",
    ]


def measured(nodeid: str, need: int) -> ItemFacts:
    return ItemFacts(nodeid, Markers(), need=need, duration=0.1, peak_open=need, waited=0.0)


def test_advice_is_never_from_one_connection() -> None:
    assert default_risky_need(1) == 2
    assert default_risky_need(2) == 2
    assert default_risky_need(15) == 8
    settings = Settings(budget=2, budget_source="--pool-budget", risky_need=1)
    assert settings.serial_advice_need == 2
    items = [measured(f"t.py::test_{n}", 1) for n in range(33)]
    assert advise(items, risky_need=settings.serial_advice_need, idle_need=0) == []


def test_advice_naming_more_than_a_tenth_of_the_tests_is_withheld_in_one_line(
    tmp_path: Any,
) -> None:
    light = [measured(f"t.py::test_{n}", 1) for n in range(90)]
    heavy = [measured(f"t.py::test_heavy_{n}", 2) for n in range(10)]
    advice = advise(light + heavy, risky_need=2, idle_need=0)
    assert len(advice) == 10
    assert withheld(light + heavy, advice, risky_need=2, budget=3) == ""  # a tenth: advised
    heavier = [*heavy, measured("t.py::test_heavy_10", 2)]
    advice = advise(light + heavier, risky_need=2, idle_need=0)
    why_not = withheld(light + heavier, advice, risky_need=2, budget=3)
    assert why_not == (
        "11 of 101 tests held 2 or more connections at once, more than 10% of them: the budget "
        "of 3 is too small to tell heavy tests from the others (--poolaware-risky-need sets "
        "the threshold)"
    )
    text = advice_text(
        advice,
        root=tmp_path,
        shown_from=tmp_path,
        budget=3,
        risky_need=2,
        idle_need=0,
        withheld_because=why_not,
    )
    assert "@pytest.mark.serial_only" not in text
    assert f"# serial_only: none: {why_not}" in text
