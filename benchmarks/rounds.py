"""Interleaved rounds of pytest runs, each test's outcome compared with a reference mode's.

markerless.py and django_tight.py run the same loop: every mode once a round, in order,
so that a busy machine's slow spells fall on every mode alike; walls are medians of the
rounds with their ratios to the reference's, and every test's outcome in a run is
compared with the reference's in the same round. What differs between them (how a mode's
run is invoked, how the JSON names the reference, what else a run's log is searched for)
is passed in, so the results they write keep their keys.
"""

from __future__ import annotations

import statistics
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import run as bench

#: Outcomes are compared with the reference's test by test: every run keeps the
#: collection's order (pytest-randomly, where installed, would shuffle each run differently).
KEEP_ORDER: Final = ("-p", "no:randomly")


class Named(Protocol):
    """A mode: its name keys the report."""

    @property
    def name(self) -> str: ...


ModeT = TypeVar("ModeT", bound=Named)


@dataclass(frozen=True)
class Run:
    """One mode's pytest run in a round; the label names its log and junit files."""

    label: str
    args: list[str]


def outcomes(junit: Path) -> dict[str, str]:
    """Outcome per test (junitxml classname::name) of one run."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
                break
        result[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return result


def run_interleaved(
    modes: Sequence[ModeT],
    reference: str,
    rounds: int,
    run_of: Callable[[ModeT, int], Run],
    env: dict[str, str],
    work: Path,
    *,
    progress: str,
    reference_key: str,
    outcomes_summed: bool,
    log_counts: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run every mode once a round; the report's ``modes`` and ``failures``.

    ``reference`` is the name of the mode the others are compared with; it runs first in
    each round. Each mode's entry names it ``ratio_over_<reference_key>`` and
    ``differences_from_<reference_key>``. Its ``outcomes`` are summed over the rounds when
    ``outcomes_summed``, else those of the last round that ran. ``log_counts`` maps an
    entry's key to a text counted in each run's log, summed over the rounds.
    """
    counted = log_counts or {}
    walls: dict[str, list[float]] = {m.name: [] for m in modes}
    tallies: dict[str, dict[str, int]] = {m.name: {} for m in modes}
    counts: dict[str, dict[str, int]] = {m.name: dict.fromkeys(counted, 0) for m in modes}
    differences: dict[str, list[str]] = {m.name: [] for m in modes}
    failures: dict[str, str] = {}
    for round_ in range(rounds):
        seen_by_reference: dict[str, str] = {}
        for mode in modes:
            print(
                f"[{progress}] {mode.name} {round_ + 1}/{rounds} ...", file=sys.stderr, flush=True
            )
            run = run_of(mode, round_)
            code, wall, tail, junit = bench.run_pytest(run.label, run.args, env, work)
            if code not in bench.RAN_EXIT_CODES or not junit.exists():
                failures[mode.name] = tail
                continue
            walls[mode.name].append(wall)
            if counted:
                log = (work / f"{run.label}.log").read_text()
                for key, text in counted.items():
                    counts[mode.name][key] += log.count(text)
            seen = outcomes(junit)
            tally = tallies[mode.name] if outcomes_summed else {}
            for outcome in seen.values():
                tally[outcome] = tally.get(outcome, 0) + 1
            tallies[mode.name] = tally
            if mode.name == reference:
                seen_by_reference = seen
                continue
            differences[mode.name] += [
                f"round {round_ + 1}: {nodeid}: {reference} {seen_by_reference.get(nodeid)}, "
                f"{mode.name} {seen.get(nodeid)}"
                for nodeid in sorted(set(seen_by_reference) | set(seen))
                if seen_by_reference.get(nodeid) != seen.get(nodeid)
            ]
    medians = {name: statistics.median(w) if w else None for name, w in walls.items()}
    base = medians[reference]

    def over_reference(median: float | None) -> float | None:
        return median / base if median is not None and base else None

    return {
        "modes": {
            name: {
                "walls": [round(w, 2) for w in walls[name]],
                "median": medians[name],
                f"ratio_over_{reference_key}": over_reference(medians[name]),
                "outcomes": tallies[name],
                **counts[name],
                f"differences_from_{reference_key}": differences[name],
            }
            for name in walls
        },
        "failures": failures,
    }
