"""The lower bound a run's wall time is measured against (``docs/design.md``, "Lower bound").

Pure arithmetic over measured (duration, need) pairs: the run summary and the JSON report
(``runstats``) and the benchmarks (``benchmarks/run.py``) all use this one function.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: A measured test: (duration in seconds, peak connections checked out at once).
Measured = tuple[float, int]


@dataclass(frozen=True)
class LowerBound:
    """The run cannot end sooner than ``value``, for each of four reasons; ``binding``
    names the largest."""

    serial: float  # the serial lane runs its tests one after another
    longest: float  # the longest fanned-out test
    workers: float  # the fan-out shared by the other workers (everything, with one worker)
    connections: float  # connection-seconds over the budget

    @property
    def value(self) -> float:
        return max(self.serial, self.longest, self.workers, self.connections)

    @property
    def binding(self) -> str:
        terms = {
            "serial lane": self.serial,
            "longest test": self.longest,
            "workers": self.workers,
            "budget": self.connections,
        }
        return max(terms, key=lambda name: terms[name])


def lower_bound(
    workers: int, budget: int, serial: Sequence[Measured], fanout: Sequence[Measured]
) -> LowerBound:
    """LB = max(sum_S p, max_P p, sum_P p / (W - 1), sum min(c, B) * p / B).

    With one worker the serial lane and the fan-out share it, so the third term is the
    sum of all durations. A test that needed more than the whole budget ran alone, so it
    holds the budget, not its need, for its duration.
    """
    serial_sum = sum(p for p, _ in serial)
    fanout_sum = sum(p for p, _ in fanout)
    shared = fanout_sum / (workers - 1) if workers > 1 else serial_sum + fanout_sum
    return LowerBound(
        serial=serial_sum,
        longest=max((p for p, _ in fanout), default=0.0),
        workers=shared,
        connections=_connection_seconds([*serial, *fanout], budget) / budget,
    )


def _connection_seconds(tests: Iterable[Measured], budget: int) -> float:
    return sum(p * min(c, budget) for p, c in tests)
