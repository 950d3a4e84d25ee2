"""The lower bound a run's wall time is measured against (``lowerbound.lower_bound``):
pure arithmetic, its four terms and which one binds (``docs/design.md``, "Lower bound")."""

from __future__ import annotations

import pytest

from pytest_poolaware.planning.lowerbound import lower_bound


@pytest.mark.parametrize(
    ("workers", "serial", "fanout", "value", "binding"),
    [
        (4, [(5.0, 1), (5.0, 1)], [(1.0, 1)] * 6, 10.0, "serial lane"),
        (4, [(1.0, 1)], [(7.0, 1), (1.0, 1)], 7.0, "longest test"),
        (4, [], [(1.0, 0)] * 12, 4.0, "workers"),
        (4, [(1.0, 15)], [(2.0, 15)] * 3, 7.0, "budget"),
        (1, [(2.0, 1)], [(1.0, 1)] * 3, 5.0, "workers"),
        (4, [], [], 0.0, "serial lane"),
        # Over the whole budget: it ran alone, holding the budget (15), not its need (45).
        (4, [], [(2.0, 45)], 2.0, "longest test"),
        (4, [(1.0, 30), (1.0, 15)], [], 2.0, "serial lane"),
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


def test_each_term_is_one_reason_the_run_cannot_end_sooner() -> None:
    bound = lower_bound(3, 4, serial=[(2.0, 1), (1.0, 2)], fanout=[(4.0, 8), (2.0, 1)])
    assert bound.serial == 3.0  # the serial lane, one test after another
    assert bound.longest == 4.0
    assert bound.workers == pytest.approx(3.0)  # 6 s of fan-out over the 2 other workers
    # Connection-seconds over the budget: 2*1 + 1*2 + 4*min(8, 4) + 2*1 = 22, over 4.
    assert bound.connections == pytest.approx(22 / 4)
    assert bound.value == pytest.approx(5.5)
    assert bound.binding == "budget"
