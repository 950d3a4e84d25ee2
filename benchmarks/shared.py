"""Benchmarks of runs sharing one server: the demo suite twice against one limited role.

    python benchmarks/shared.py [--rounds N] [--out DIR]

Cases, each in interleaved rounds after one cold run per copy (so every case runs warm):

- ``alone``: one run;
- ``sequential``: the two copies one after the other (the wall is the sum);
- ``pair``: both started at the same moment, sharing the room (``--poolaware-share auto``);
- ``pair-no-share``: the same with ``--poolaware-share off``: each takes what it finds;
- ``pair-killed``: both started together, one killed with SIGKILL after ``KILL_AFTER``
  seconds; the figures are the survivor's.

Per case: wall, passed/failed/errors, connection errors (junitxml), refusals (tests the
server refused a connection and poolaware reran), and the role's server-side peak.
Writes DIR/shared.md and DIR/shared.json. Timings from a busy machine mean little:
compare the cases side by side, on a quiet one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from run import (
    DEFAULT_OUT,
    HERE,
    PASS_TIMEOUT,
    SUITE,
    WORKERS,
    PeakMonitor,
    demo_role,
    loadavg,
    machine_info,
    pool_env,
    read_junit,
)

ROUNDS: Final = 3
CASES: Final = ("alone", "sequential", "pair", "pair-no-share", "pair-killed")
#: Seconds after which the pair-killed case kills one run (mid-run on the demo suite).
KILL_AFTER: Final = 6.0
#: What poolaware's summary says of a test the server refused a connection and that it reran.
REFUSED: Final = "rerun alone (the server refused a connection)"


@dataclass
class Figures:
    case: str
    wall: float = 0.0
    passed: int = 0
    failed: int = 0
    errors: int = 0
    conn_errors: int = 0
    refusals: int = 0
    server_peak: int = 0
    exit_codes: list[int] = field(default_factory=list)


class Pass:
    """One pytest run of the demo suite, started now, in its own session and cache."""

    def __init__(self, label: str, copy: str, env: dict[str, str], work: Path, *extra: str):
        self.junit = work / f"{label}.xml"
        self.junit.unlink(missing_ok=True)
        self.log = work / f"{label}.log"
        cache = f"cache_dir={work / ('cache-' + copy)}"
        command = [
            sys.executable, "-m", "pytest", str(SUITE), "-o", cache, "-q",
            "-n", str(WORKERS), "--dist", "poolaware", f"--junitxml={self.junit}", *extra,
        ]  # fmt: skip
        self._out = self.log.open("w")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command, stdout=self._out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.ended = self.started

    def wait(self) -> int:
        try:
            code = self.process.wait(timeout=PASS_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait()
        self.ended = time.perf_counter()
        self._out.close()
        return code

    def kill(self) -> None:
        """SIGKILL the controller only, as a cancelled job's runner might: its workers
        and their connections linger until they notice."""
        self.process.send_signal(signal.SIGKILL)

    def add_to(self, figures: Figures) -> None:
        figures.exit_codes.append(self.process.returncode)
        text = self.log.read_text()
        figures.refusals += text.count(REFUSED)
        if self.junit.exists():
            for case in read_junit(self.junit)[1]:
                if case.outcome in ("passed", "failed", "errors"):
                    setattr(figures, case.outcome, getattr(figures, case.outcome) + 1)
                figures.conn_errors += case.conn_error


def run_case(case: str, env: dict[str, str], work: Path, peak: PeakMonitor) -> Figures:
    figures = Figures(case)
    label = f"{case}-{int(time.time() * 1000)}"
    begun = time.perf_counter()
    if case == "alone":
        passes = [Pass(label, "a", env, work)]
        passes[0].wait()
    elif case == "sequential":
        passes = []
        for copy in ("a", "b"):
            passes.append(Pass(f"{label}-{copy}", copy, env, work))
            passes[-1].wait()
    else:
        extra = ("--poolaware-share", "off" if case == "pair-no-share" else "auto")
        passes = [Pass(f"{label}-{copy}", copy, env, work, *extra) for copy in ("a", "b")]
        if case == "pair-killed":
            time.sleep(KILL_AFTER)
            passes[0].kill()
        for one in passes:
            one.wait()
        if case == "pair-killed":
            passes = passes[1:]  # the survivor's figures
    figures.wall = time.perf_counter() - begun
    for one in passes:
        one.add_to(figures)
    figures.server_peak = peak.peak
    return figures


def fold(rounds: Sequence[Figures]) -> dict[str, Any]:
    """Median wall, worst counts."""
    return {
        "case": rounds[0].case,
        "wall": round(statistics.median(r.wall for r in rounds), 2),
        "walls": [round(r.wall, 2) for r in rounds],
        "passed": min(r.passed for r in rounds),
        "failed": max(r.failed for r in rounds),
        "errors": max(r.errors for r in rounds),
        "conn_errors": max(r.conn_errors for r in rounds),
        "refusals": max(r.refusals for r in rounds),
        "server_peak": max(r.server_peak for r in rounds),
        "exit_codes": [c for r in rounds for c in r.exit_codes],
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Shared server: demo suite x2, W={WORKERS} each, one role, "
        f"{report['rounds']} interleaved rounds (warm); machine {report['machine']}.",
        "",
        "| case | wall s (median) | rounds | passed | failed | errors | conn errors "
        "| refusals | server peak |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["cases"]:
        lines.append(
            f"| {row['case']} | {row['wall']:.1f} | {row['walls']} | {row['passed']} "
            f"| {row['failed']} | {row['errors']} | {row['conn_errors']} | {row['refusals']} "
            f"| {row['server_peak']} |"
        )
    ratio = report.get("pair_over_sequential")
    if ratio is not None:
        lines += ["", f"pair / sequential: {ratio} (median of per-round ratios)"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or args.rounds < 1:
        parser.error(f"--cases from {', '.join(CASES)}; --rounds >= 1")
    from poolaware_testserver import postgres_dsn

    out: Path = args.out
    work = out / "work-shared"
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rounds": args.rounds,
    }
    with postgres_dsn() as admin_dsn, demo_role(admin_dsn) as (role, dsn):
        report["machine"] = machine_info(admin_dsn)
        env = pool_env(dsn, pythonpath=HERE)
        for copy in ("a", "b"):  # learn first: every case runs warm
            warm_up = Pass(f"warm-up-{copy}", copy, env, work, "--cache-clear")
            warm_up.wait()
        rounds: dict[str, list[Figures]] = {case: [] for case in cases}
        for round_ in range(args.rounds):
            for case in cases:
                print(f"[shared] {case} {round_ + 1}/{args.rounds} ...", file=sys.stderr)
                with PeakMonitor(admin_dsn, role) as peak:
                    rounds[case].append(run_case(case, env, work, peak))
        report["cases"] = [fold(r) for r in rounds.values()]
        report["raw"] = {case: [asdict(r) for r in rs] for case, rs in rounds.items()}
        if "pair" in rounds and "sequential" in rounds:
            ratios = [
                p.wall / s.wall for p, s in zip(rounds["pair"], rounds["sequential"], strict=True)
            ]
            report["pair_over_sequential"] = round(statistics.median(ratios), 3)
    report["loadavg_at_end"] = loadavg()
    markdown = render(report)
    (out / "shared.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "shared.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
