"""The lower bound a run's wall time is measured against (``docs/design.md``, "Lower bound").

Pure arithmetic over measured (duration, need) pairs: the run summary and the JSON report
(``runstats``), the benchmarks (``benchmarks/run.py``) and the core's property tests
(``tests/test_lowerbound.py``) all use this one function. Durations are net of the time
a test waited at the connect gate: that waiting depends on the schedule, so a better
schedule could have saved it, and a bound that counted it as work would excuse it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: A measured test: (duration in seconds, net of its waits at the connect gate; peak
#: connections checked out at once).
Measured = tuple[float, int]


@dataclass(frozen=True)
class LowerBound:
    """The run cannot end sooner than ``value``, for each of five reasons; ``binding``
    names the largest (the first of equal ones, in the order of the fields)."""

    serial: float  # the serial lane runs its tests one after another
    longest: float  # the longest test runs on one worker
    workers: float  # every test runs on one of the W workers
    connections: float  # connection-seconds over the budget
    #: The serial lane, plus the fan-out tests that cannot run beside any serial test
    #: (each with every serial test needs more than the budget) in the lane's gaps.
    conflicts: float = 0.0
    budget: int = 0  # B: the largest budget in force during the run

    @property
    def value(self) -> float:
        return max(self.serial, self.longest, self.workers, self.connections, self.conflicts)

    @property
    def binding(self) -> str:
        terms = {
            "serial lane": self.serial,
            "longest test": self.longest,
            "workers": self.workers,
            "budget": self.connections,
            "serial lane + conflicts": self.conflicts,
        }
        return max(terms, key=lambda name: terms[name])


def lower_bound(
    workers: int, budget: int, serial: Sequence[Measured], fanout: Sequence[Measured]
) -> LowerBound:
    """LB = max(sum_S p, max p, (sum_S p + sum_P p) / W, sum min(c, B) * p / B,
    sum_S p + sum_X min(c, B) * p / B), X the fan-out tests that conflict with the lane.

    ``budget`` is B, the largest budget in force during the run. A test that needed more
    than the whole budget ran alone, so it holds the budget, not its need, for its
    duration. The serial lane's worker joins the fan-out once its lane is empty, so every
    test shares the W workers. Proof sketch: ``docs/design.md``, "Lower bound".
    """
    serial_sum = sum(p for p, _ in serial)
    everything = [*serial, *fanout]
    in_gaps = _connection_seconds(conflicting(budget, serial, fanout), budget)
    return LowerBound(
        serial=serial_sum,
        longest=max((p for p, _ in everything), default=0.0),
        workers=(serial_sum + sum(p for p, _ in fanout)) / max(workers, 1),
        connections=_connection_seconds(everything, budget) / budget,
        conflicts=serial_sum + in_gaps / budget,
        budget=budget,
    )


def conflicting(
    budget: int, serial: Sequence[Measured], fanout: Sequence[Measured]
) -> list[Measured]:
    """The fan-out tests that cannot run while any serial test runs: beside each one, the
    two would hold more than the budget (a need over it counts as the whole budget)."""
    if not serial:
        return []
    lightest = min(min(c, budget) for _, c in serial)
    return [(p, c) for p, c in fanout if min(c, budget) + lightest > budget]


def _connection_seconds(tests: Sequence[Measured], budget: int) -> float:
    return sum(p * min(c, budget) for p, c in tests)
