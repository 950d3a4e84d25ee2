"""What a ``--dist poolaware`` run tells its user: the terminal summary and the files asked for."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

import pytest

from pytest_poolaware.planning.core import Lane
from pytest_poolaware.reporting.advice import advice_text, advise, advised, withheld
from pytest_poolaware.reporting.findings import overrun_warnings, rerun_lines, stall_warnings
from pytest_poolaware.reporting.runstats import (
    Candidate,
    ItemFacts,
    ItemResult,
    LaneTime,
    RunSnapshot,
    RunStats,
    Uncounted,
    lane_times,
    worker_times,
)
from pytest_poolaware.shared.markers import Markers
from pytest_poolaware.shared.server_view import ServerView
from pytest_poolaware.shared.settings import ENV_DSN, Settings

#: Tests listed under "most connections at once": by default, and with -v.
TOP_NEEDS: Final = 3
TOP_NEEDS_VERBOSE: Final = 10
#: Marker advice lines shown by default (all of them with -v or in the advice file).
ADVICE_SHOWN: Final = 3
#: Tests listed under "connections still held at a test's end" by default (all with -v).
LEAKS_SHOWN: Final = 3
#: Notes shown by default (all of them with -v and in the JSON report).
NOTES_SHOWN: Final = 4
LANE_NAMES: Final = {Lane.SERIAL: "serial lane", Lane.FANOUT: "fan-out"}


def collect(
    *,
    settings: Settings,
    snapshot: RunSnapshot,
    started: float,
    finished: float,
    outcomes: Mapping[str, str],
    server: ServerView | None = None,
    notes: Sequence[str] = (),
    warnings: Sequence[str] = (),
    budget: tuple[int, str] | None = None,
    held_back_by_runs: float | None = None,
) -> RunStats:
    """The run's facts: the scheduler's snapshot, the outcomes, what the server saw.
    ``budget``: the one the run ended with and where it came from (by default the
    configured one); ``held_back_by_runs``: seconds other runs sharing the server held
    this one back (None: none was met)."""
    budget_now, budget_source = budget or (settings.budget, settings.budget_source)
    results = {result.nodeid: result for result in snapshot.results}  # the last attempt wins
    priors = snapshot.priors or (None,) * len(snapshot.collection)
    items = [
        item_facts(nodeid, markers, lane, results.get(nodeid), outcomes.get(nodeid), prior)
        for nodeid, markers, lane, prior in zip(
            snapshot.collection, snapshot.markers, snapshot.lanes, priors, strict=True
        )
    ]
    risky_need = settings.advice_need(budget_now)
    advice = advise(items, risky_need=risky_need, idle_need=settings.idle_need)
    return RunStats(
        budget=budget_now,
        budget_source=budget_source,
        workers=snapshot.workers,
        items=tuple(items),
        peak_open=snapshot.peak_open,
        started=started,
        finished=finished,
        timeline=snapshot.timeline,
        budgets=snapshot.budgets,
        server=server,
        overruns=snapshot.overruns,
        stalls=snapshot.stalls,
        notes=(*snapshot.notes, *notes),
        warnings=tuple(warnings),
        advice=tuple(advice),
        advice_withheld=withheld(items, advice, risky_need=risky_need, budget=budget_now),
        order=snapshot.order,
        placement=snapshot.placement,
        learned=snapshot.learned,
        largest_budget=snapshot.largest_budget,
        held_back_by_runs=held_back_by_runs,
    )


def item_facts(
    nodeid: str,
    markers: Markers,
    lane: Lane,
    result: ItemResult | None,
    outcome: str | None,
    prior: int | None = None,
) -> ItemFacts:
    """One collected item's facts: its last attempt's measures, if it ran (its lane is then
    the one it ran in), with its outcome, and the relative's need it was planned with."""
    if result is None:
        return ItemFacts(nodeid, markers, lane, outcome=outcome, prior=prior)
    m = result.measures
    return ItemFacts(
        nodeid,
        markers,
        result.lane,
        worker=result.worker,
        start=m.start,
        end=m.end,
        duration=m.duration,
        need=m.need,
        peak_open=m.peak_open,
        waited=m.waited,
        go_wait=m.go_waited,
        gate_wait=m.gate_waited,
        rerun=m.rerun,
        outcome=outcome,
        waits=m.waits,
        held_back=result.held_back,
        drivers=tuple(m.drivers),
        leaks=m.leaks,
        prior=prior,
    )


def write_files(
    stats: RunStats, settings: Settings, *, root: Path, invocation_dir: Path
) -> list[str]:
    """Write the report, timeline and advice files asked for; one line per file for the
    summary (a file that cannot be written is a warning, not a failure)."""
    from pytest_poolaware.reporting import timeline, trace_events

    outputs: list[tuple[str, str | None, Callable[[], str]]] = [
        ("report", settings.report_path, lambda: json.dumps(stats.to_json(), indent=1) + "\n"),
        (
            "timeline",
            settings.timeline_path,
            lambda: timeline.render(
                timeline=stats.timeline,
                budget=stats.budget,
                serial=[
                    timeline.Span(i.start, i.end, i.nodeid)
                    for i in stats.items
                    if i.lane is Lane.SERIAL and i.start is not None and i.end is not None
                ],
                server=stats.server.timeline if stats.server else (),
                start=stats.started,
                end=stats.finished,
            ),
        ),
        ("trace", settings.trace_path, lambda: trace_events.render(stats)),
        (
            "advice",
            settings.advice_path,
            lambda: advice_text(
                stats.advice,
                root=root,
                shown_from=invocation_dir,
                budget=stats.budget,
                risky_need=settings.advice_need(stats.budget),
                idle_need=settings.idle_need,
                withheld_because=stats.advice_withheld,
            ),
        ),
    ]
    lines = []
    for what, path, render in outputs:
        if path is None:
            continue
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            Path(path).write_text(render(), encoding="utf-8")
        except OSError as exc:
            lines.append(f"WARNING: could not write the {what} to {path}: {exc}")
        else:
            lines.append(f"poolaware {what}: {path}")
    return lines


def write_summary(
    terminalreporter: pytest.TerminalReporter, stats: RunStats, settings: Settings, files: list[str]
) -> None:
    """One section: a line with -q, the usual picture by default, more with -v; reruns,
    warnings and notes at every verbosity but -qq, which keeps only warnings and notes."""
    tr = terminalreporter
    verbose: int = tr.config.option.verbose
    warnings = _warnings(stats, verbose) + [line for line in files if line.startswith("WARNING")]
    if verbose < -1:
        if warnings:
            tr.write_sep("-", "poolaware")
            for line in warnings:
                tr.write_line(line)
        return
    tr.write_sep("-", "poolaware")
    lines = [_one_line(stats)] if verbose < 0 else _full(stats, settings, verbose)
    reruns = [(item.nodeid, item.rerun) for item in stats.items if item.rerun]
    lines += rerun_lines(reruns, verbose=verbose > 0)
    lines += warnings
    if verbose >= 0:
        lines += [line for line in files if not line.startswith("WARNING")]
    for line in lines:
        tr.write_line(line)


def _one_line(stats: RunStats) -> str:
    server = f" (server {stats.server.peak})" if stats.server else ""
    parts = [f"budget {stats.budget}", f"peak {stats.peak_open} open{server}"]
    bound = stats.lower_bound.value
    if bound > 0:
        parts.append(f"wall {_secs(stats.wall)} vs LB {_secs(bound)} ({stats.wall / bound:.2f}x)")
    advice = advised(stats.advice, stats.advice_withheld)
    if advice:
        parts.append(f"{len(advice)} marker advice (see the summary without -q)")
    return "poolaware: " + ", ".join(parts)


def _full(stats: RunStats, settings: Settings, verbose: int) -> list[str]:
    lines = [
        f"budget: {stats.budget} connections ({stats.budget_source})",
        f"peak open connections (workers): {stats.peak_open}",
    ]
    lines += _server_lines(stats, settings, verbose)
    lanes = lane_times(stats.items)
    for lane in Lane:
        spent = lanes.get(lane, LaneTime())
        if spent.items or verbose > 0 or lane is Lane.FANOUT:  # an empty serial lane: no line
            lines.append(_time_line(LANE_NAMES[lane], spent))
    if verbose > 0:
        workers = worker_times(stats.items)
        for worker in sorted(workers):
            lines.append("  " + _time_line(f"worker {worker}", workers[worker]))
    top = stats.top_needs(TOP_NEEDS_VERBOSE if verbose > 0 else TOP_NEEDS)
    if top:
        lines.append("most connections at once:")
        lines += [
            f"  {item.need:>3}  {item.lane.value:<6}  {item.nodeid}{_drivers(item)}" for item in top
        ]
    leaking = stats.leaking
    if leaking:
        listed = leaking if verbose > 0 else leaking[:LEAKS_SHOWN]
        lines.append("connections still held at a test's end (opened or checked out by it):")
        lines += [f"  {item.leaks:>3}  {item.nodeid}" for item in listed]
        if len(listed) < len(leaking):
            lines.append(f"  ... and {len(leaking) - len(listed)} more tests (-v lists them)")
    lines.append(_wall_line(stats))
    lines += _advice_lines(stats, settings, verbose)
    return lines


def _server_lines(stats: RunStats, settings: Settings, verbose: int) -> list[str]:
    """The server's peak and what the workers did not count, when monitored."""
    server = stats.server
    if server is None:
        if verbose > 0 and not settings.monitor_dsn:
            return [
                "peak open connections (server): not monitored "
                f"(set ${ENV_DSN} or --poolaware-monitor)"
            ]
        return []
    lines = [
        f"peak open connections (server): {server.peak} ({server.scope}, "
        f"{server.samples} samples every {server.interval:g}s)"
    ]
    missed = stats.uncounted
    # All zeros say nothing by default: every connection was counted, none was left.
    if missed is not None and (verbose > 0 or missed != Uncounted(0, 0, 0)):
        lines.append(
            f"not counted by the workers (server minus workers): up to {missed.most} "
            f"at once; at the end {missed.end_server} open on the server, "
            f"{missed.end_workers} counted"
        )
    return lines


def _drivers(item: ItemFacts) -> str:
    return f"  ({', '.join(item.drivers)})" if item.drivers else ""


def _time_line(name: str, time: LaneTime) -> str:
    """Time spent, and held back: waiting for a go (before a test starts) and at the
    connect gate (inside its running time, and left out of the lower bound)."""
    line = (
        f"{name}: {time.items} tests, running {_secs(time.running)}, "
        f"held back by the budget {_secs(time.waited)}"
    )
    if time.go_wait or time.gate_wait:
        line += f" (for a go {_secs(time.go_wait)}, at the connect gate {_secs(time.gate_wait)})"
    return line


def _wall_line(stats: RunStats) -> str:
    bound = stats.lower_bound
    text = (
        f"wall: {_secs(stats.wall)} from the first test's start to the last one's end "
        f"(session {_secs(stats.session)})"
    )
    if bound.value > 0:
        ratio = stats.wall / bound.value
        text += f"; lower bound {_secs(bound.value)} ({bound.binding}), wall/LB {ratio:.2f}"
    return text


def _advice_lines(stats: RunStats, settings: Settings, verbose: int) -> list[str]:
    """The advice (a few candidates; all with -v), or why ``serial_only`` advice is
    withheld, in one line, instead of a list that names most of the suite."""
    lines = []
    if stats.advice_withheld:
        lines.append(f"marker advice: no serial_only advice: {stats.advice_withheld}")
    advice: Sequence[Candidate] = advised(stats.advice, stats.advice_withheld)
    if not advice:
        return lines
    listed = advice if verbose > 0 else advice[:ADVICE_SHOWN]
    risky_need = settings.advice_need(stats.budget)
    lines.append(
        f"marker advice (serial_only from {risky_need} connections at once, "
        f"parallel_safe up to {settings.idle_need}):"
    )
    for candidate in listed:
        tests = f" ({candidate.tests} tests)" if candidate.tests > 1 else ""
        lines.append(
            f"  {candidate.marker} candidate: {candidate.target}{tests}: {candidate.reason}"
        )
    hints = []
    if len(listed) < len(advice):
        hints.append(f"... and {len(advice) - len(listed)} more (-v shows them all)")
    if not settings.advice_path:
        hints.append("--poolaware-advice=PATH writes them as file:line: decorator")
    if hints:
        lines.append(f"  ({'; '.join(hints)})")
    return lines


def _warnings(stats: RunStats, verbose: int) -> list[str]:
    """Warnings, one line per cause, then notes (a few; all with -v)."""
    lines = [f"WARNING: {warning}" for warning in stats.warnings]
    lines += stall_warnings(stats.stalls, stats.nodeid_at, verbose=verbose > 0)
    lines += overrun_warnings(stats.overruns, stats.nodeid_of, verbose=verbose > 0)
    notes = list(stats.notes)
    if verbose <= 0 and len(notes) > NOTES_SHOWN:
        rest = len(notes) - NOTES_SHOWN + 1
        notes = [*notes[: NOTES_SHOWN - 1], f"{rest} more notes (-v shows them all)"]
    return lines + [f"note: {note}" for note in notes]


def _secs(seconds: float) -> str:
    return f"{seconds:.2f}s" if seconds < 100 else f"{seconds:.0f}s"


#: The error shown for an item no worker ran (they all crashed, or xdist gave up on them).
NOT_RUN: Final = "not run: no worker was left to run it"


def not_run(config: pytest.Config, session: pytest.Session, nodeids: Sequence[str]) -> None:
    """Report the items that never ran as errors, so that no test is silently lost."""
    for nodeid in nodeids:
        path = nodeid.split("::", 1)[0]
        config.hook.pytest_runtest_logreport(
            report=pytest.TestReport(nodeid, (path, None, nodeid), {}, "failed", NOT_RUN, "setup")
        )
    if nodeids and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
