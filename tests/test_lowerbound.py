"""The lower bound a run's wall time is measured against (``lowerbound.lower_bound``):
pure arithmetic, its five terms and which one binds (``docs/design.md``, "Lower bound")."""

from __future__ import annotations

import pytest

from pytest_poolaware.planning.lowerbound import conflicting, lower_bound


@pytest.mark.parametrize(
    ("workers", "serial", "fanout", "value", "binding"),
    [
        (4, [(5.0, 1), (5.0, 1)], [(1.0, 1)] * 6, 10.0, "serial lane"),
        (4, [(1.0, 1)], [(7.0, 1), (1.0, 1)], 7.0, "longest test"),
        # The serial lane's worker joins the fan-out: 12 s over all 4 workers, not 3.
        (4, [], [(1.0, 0)] * 12, 3.0, "workers"),
        (4, [(4.0, 0)], [(1.0, 0)] * 8, 4.0, "serial lane"),
        (2, [(1.0, 0)], [(1.0, 0)] * 5, 3.0, "workers"),
        (4, [(1.0, 15)], [(2.0, 15)] * 3, 7.0, "budget"),
        (1, [(2.0, 1)], [(1.0, 1)] * 3, 5.0, "workers"),
        (4, [], [], 0.0, "serial lane"),
        # Over the whole budget: it ran alone, holding the budget (15), not its need (45).
        (4, [], [(2.0, 45)], 2.0, "longest test"),
        (4, [(1.0, 30), (1.0, 15)], [], 2.0, "serial lane"),
        # The demo's shape: 12 + 8 > 15, so the unmarked heavy test runs in a gap of the
        # lane (12/15 of its second), after the lane's 5 s or before it.
        (4, [(1.0, 8)] * 5, [(1.0, 12)] + [(0.5, 1)] * 10, 5.8, "serial lane + conflicts"),
    ],
)
def test_lower_bound_terms(
    workers: int,
    serial: list[tuple[float, int]],
    fanout: list[tuple[float, int]],
    value: float,
    binding: str,
) -> None:
    bound = lower_bound(workers, 15, serial, fanout)
    assert bound.value == pytest.approx(value)
    assert bound.binding == binding
    assert bound.budget == 15


def test_each_term_is_one_reason_the_run_cannot_end_sooner() -> None:
    bound = lower_bound(3, 4, serial=[(2.0, 1), (1.0, 2)], fanout=[(4.0, 8), (2.0, 1)])
    assert bound.serial == 3.0  # the serial lane, one test after another
    assert bound.longest == 4.0
    assert bound.workers == pytest.approx(3.0)  # 9 s of tests over the 3 workers
    # Connection-seconds over the budget: 2*1 + 1*2 + 4*min(8, 4) + 2*1 = 22, over 4.
    assert bound.connections == pytest.approx(22 / 4)
    # The 8-connection test holds the whole budget: beside the lightest serial test (1)
    # it would be over it, so it runs while the lane does not: 3 s + 4*4/4 s.
    assert bound.conflicts == pytest.approx(7.0)
    assert bound.value == pytest.approx(7.0)
    assert bound.binding == "serial lane + conflicts"


@pytest.mark.parametrize(
    ("serial", "fanout", "expected"),
    [
        # It fits beside the 3-connection serial test, so it may overlap the lane.
        ([(1.0, 8), (1.0, 3)], [(1.0, 10)], []),
        ([(1.0, 8), (1.0, 6)], [(1.0, 10)], [(1.0, 10)]),
        # Needs are capped at the budget: a test over it holds the budget, and a serial
        # test that holds nothing may run beside it.
        ([(1.0, 40)], [(1.0, 1), (1.0, 0)], [(1.0, 1)]),
        ([(1.0, 0)], [(1.0, 40)], []),
        # No serial lane: nothing to conflict with (the budget term covers the rest).
        ([], [(1.0, 15)], []),
    ],
)
def test_a_fanout_test_conflicts_when_it_fits_beside_no_serial_test(
    serial: list[tuple[float, int]],
    fanout: list[tuple[float, int]],
    expected: list[tuple[float, int]],
) -> None:
    assert conflicting(15, serial, fanout) == expected
