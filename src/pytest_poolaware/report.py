"""Terminal summary of a ``--dist poolaware`` run."""

from __future__ import annotations

from typing import Any

from pytest_poolaware.settings import Settings


def write_summary(terminalreporter: Any, settings: Settings, scheduler: Any, record: Any) -> None:
    """Budget, peaks, overruns, reruns and notes; one section, quiet with -q."""
    tr = terminalreporter
    stats = scheduler.planner.statistics()
    if tr.config.option.verbose < 0 and not (stats.overruns or record.notes):
        return
    tr.write_sep("-", "poolaware")
    tr.write_line(f"budget: {settings.budget} connections ({settings.budget_source})")
    tr.write_line(f"peak open connections (workers): {stats.peak_open}")
    for result in record.results:
        if result.measures.rerun:
            tr.write_line(f"rerun alone ({result.measures.rerun}): {result.nodeid}")
    collection = scheduler.collection or []
    for overrun in stats.overruns:
        name = collection[overrun.index] if 0 <= overrun.index < len(collection) else "?"
        where = "alone" if overrun.alone else "beside other tests"
        tr.write_line(
            f"WARNING: {name} needed {overrun.need} connections, more than the room in the "
            f"budget of {overrun.budget}; it ran {where}"
        )
    for note in record.notes:
        tr.write_line(f"note: {note}")
