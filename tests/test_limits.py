"""The record the planner follows of the run's budget."""

from __future__ import annotations

import pytest

from pytest_poolaware.shared.limits import Limits


def test_a_ceiling_below_the_budget_is_the_budget() -> None:
    assert Limits(5).ceiling == 5
    assert Limits(5, 3).ceiling == 5
    assert Limits(5, 9).ceiling == 9
    assert Limits(5) == Limits(5, 5)


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="budget must not be negative, got -1"):
        Limits(-1)
    assert Limits(0, 4).ceiling == 4  # another run's request needs the whole room
