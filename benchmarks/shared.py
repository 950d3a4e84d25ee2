"""Benchmarks of runs sharing one server: a suite K times against one limited role.

    python benchmarks/shared.py [--rounds N] [--cases A,B,...] [--out DIR]
                                [--suite demo|harder] [--copies K] [--hog N] [--cold]

``--suite harder`` runs ``benchmarks/harder`` (``serial_only`` tests of 7-8 connections,
one unmarked test of 12, 200 light tests) instead of the demo; ``--copies K`` (2 or 3)
how many copies ``sequential``, ``pair`` and ``pair-no-share`` run (``pair`` is then K
copies started together). ``--hog N`` keeps N busy processes (``yes``) running beside
the rounds, as on a CI machine shared with other jobs; ``--cold`` clears each run's
cache in every round (no warm-up), as a CI job without a restored cache.

Cases, each in interleaved rounds after one cold run per copy (so every case but
``learned-cold`` runs warm):

- ``alone``: one run;
- ``sequential``: the two copies one after the other (the wall is the sum);
- ``pair``: both started at the same moment, sharing the room (``--poolaware-share auto``);
- ``pair-no-share``: the same with ``--poolaware-share off``: each takes what it finds;
- ``pair-killed``: both started together, one killed with SIGKILL after ``KILL_AFTER``
  seconds; the figures are the survivor's;
- ``learned-cold`` / ``learned-warm``: one run told nothing of the server (no ``PG_POOL_*``,
  no budget option, no ``POOLAWARE_DSN``): the suite reads its DSN from ``APP_DSN`` and the
  plugin learns the server from the first connection a worker opens; cold clears the
  cache, warm follows it (run both, in that order, for a warm figure);
- ``socket`` / ``socket-pair``: one run, or two started together, whose ``WORKERS``
  workers each are reached through a ``--tx socket=`` gateway on an execnet socket server
  of their own on localhost (fresh servers per run).

Per case: wall, passed/failed/errors, connection errors (junitxml), refusals (tests the
server refused a connection and poolaware reran), reruns (tests rerun for any reason,
from the runs' reports), the role's server-side peak, and the
budget each run's report gives with its source.
Writes DIR/shared.md and DIR/shared.json. Timings from a busy machine mean little:
compare the cases side by side, on a quiet one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
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
CASES: Final = (
    "alone", "sequential", "pair", "pair-no-share", "pair-killed",
    "learned-cold", "learned-warm", "socket", "socket-pair",
)  # fmt: skip
#: Seconds after which the pair-killed case kills one run (mid-run on the demo suite).
KILL_AFTER: Final = 6.0
#: What poolaware's summary says of a test the server refused a connection and that it reran.
REFUSED: Final = "rerun alone (the server refused a connection)"
#: The suite's own DSN variable in the learned cases: the plugin is not told about it.
APP_DSN: Final = "APP_DSN"
#: The line of the demo conftest naming its DSN variable (rewritten for the learned cases).
SUITE_DSN_LINE: Final = 'ENV_DSN: Final = "POOLAWARE_DSN"'
#: Variables that would tell the plugin of the server or of a budget.
CONFIGURING: Final = ("POOLAWARE_DSN", "PG_POOL_SIZE", "PG_MAX_OVERFLOW", "PG_POOL_TIMEOUT")
#: Bound on the wait for an execnet socket server to listen.
LISTEN_TIMEOUT: Final = 30.0
LISTEN_POLL: Final = 0.05
LOCAL_WORKERS: Final = ("-n", str(WORKERS))
#: The suites, by ``--suite``.
SUITES: Final = {"demo": SUITE, "harder": Path(__file__).resolve().parent / "harder"}
#: Names of the copies, by start order.
COPIES: Final = "abc"
#: pytest's console script beside this Python.
PYTEST: Final = Path(sys.executable).with_name("pytest")


@dataclass
class Figures:
    case: str
    wall: float = 0.0
    passed: int = 0
    failed: int = 0
    errors: int = 0
    conn_errors: int = 0
    refusals: int = 0
    reruns: int = 0
    server_peak: int = 0
    exit_codes: list[int] = field(default_factory=list)
    budgets: list[str] = field(default_factory=list)


class Pass:
    """One pytest run of the demo suite, started now, in its own session and cache."""

    def __init__(
        self,
        label: str,
        copy: str,
        env: dict[str, str],
        work: Path,
        *extra: str,
        suite: Path = SUITE,
        workers: Sequence[str] = LOCAL_WORKERS,
    ):
        self.junit = work / f"{label}.xml"
        self.junit.unlink(missing_ok=True)
        self.report = work / f"{label}.json"
        self.report.unlink(missing_ok=True)
        self.log = work / f"{label}.log"
        cache = f"cache_dir={work / ('cache-' + copy)}"
        # No path argument: xdist maps those onto rsync roots for remote workers. The
        # console script, not ``-m``: the pytest xdist syncs into the directory is not ours.
        command = [
            str(PYTEST), "-o", cache, "-q", *workers,
            "--dist", "poolaware", f"--junitxml={self.junit}",
            f"--poolaware-report={self.report}", *extra,
        ]  # fmt: skip
        self._out = self.log.open("w")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command,
            cwd=suite,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
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
        if self.report.exists():
            report = json.loads(self.report.read_text())
            run = report["run"]
            figures.budgets.append(f"{run['budget']} ({run['budget_source']})")
            figures.reruns += sum(1 for test in report["tests"] if test.get("rerun"))


def free_port() -> int:
    """A localhost port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextlib.contextmanager
def socket_workers(count: int, env: dict[str, str], suite: Path) -> Iterator[list[str]]:
    """``count`` execnet socket servers on localhost, started with ``env`` as a machine of
    their own would have it; yields the ``--tx`` arguments reaching one worker on each."""
    import execnet.script.socketserver as server_script

    ports = [free_port() for _ in range(count)]
    servers = [
        subprocess.Popen(
            [sys.executable, server_script.__file__, f"127.0.0.1:{port}"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        deadline = time.monotonic() + LISTEN_TIMEOUT
        for port, server in zip(ports, servers, strict=True):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"no execnet socket server on port {port}") from None
                    time.sleep(LISTEN_POLL)
        yield [arg for port in ports for arg in ("--tx", f"socket=127.0.0.1:{port}//chdir={suite}")]
    finally:
        for server in servers:
            server.kill()
            server.wait()


def learned_env(dsn: str) -> dict[str, str]:
    """The environment of a run told nothing of the server: the suite's DSN in ``APP_DSN``."""
    env = pool_env(dsn, pythonpath=HERE)
    for name in CONFIGURING:
        env.pop(name, None)
    env[APP_DSN] = dsn
    return env


def suite_copy(work: Path, name: str) -> Path:
    """A copy of the demo suite: what remote workers change into (xdist may sync files
    there), or what the learned cases rewrite."""
    suite = work / f"{name}-suite"
    shutil.rmtree(suite, ignore_errors=True)
    shutil.copytree(SUITE, suite, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    return suite


def learned_suite(work: Path) -> Path:
    """A copy of the demo suite whose conftest reads its DSN from ``APP_DSN``."""
    suite = suite_copy(work, "learned")
    conftest = suite / "conftest.py"
    text = conftest.read_text()
    if SUITE_DSN_LINE not in text:
        raise RuntimeError(f"{conftest} no longer has {SUITE_DSN_LINE!r}")
    conftest.write_text(text.replace(SUITE_DSN_LINE, f'ENV_DSN: Final = "{APP_DSN}"'))
    return suite


def run_case(
    case: str,
    env: dict[str, str],
    work: Path,
    peak: PeakMonitor,
    learned: tuple[dict[str, str], Path],
    remote: Path,
    *,
    suite: Path = SUITE,
    copies: int = 2,
    cold: bool = False,
) -> Figures:
    """One round of ``case``; ``learned`` is the learned cases' environment and suite,
    ``remote`` the suite copy socket workers change into; ``cold``: the alone, sequential
    and pair runs clear their caches."""
    clear_cache = ("--cache-clear",) if cold else ()
    figures = Figures(case)
    label = f"{case}-{int(time.time() * 1000)}"
    begun = time.perf_counter()
    if case.startswith("learned"):
        learned_environ, suite = learned
        clear = ("--cache-clear",) if case == "learned-cold" else ()
        passes = [Pass(label, "learned", learned_environ, work, *clear, suite=suite)]
        passes[0].wait()
    elif case.startswith("socket"):
        names = ("a", "b") if case == "socket-pair" else ("a",)
        with socket_workers(WORKERS * len(names), env, remote) as tx:
            share = tx[: 2 * WORKERS], tx[2 * WORKERS :]
            passes = [
                Pass(f"{label}-{name}", name, env, work, suite=remote, workers=workers)
                for name, workers in zip(names, share, strict=False)
            ]
            for one in passes:
                one.wait()
    elif case == "alone":
        passes = [Pass(label, "a", env, work, *clear_cache, suite=suite)]
        passes[0].wait()
    elif case == "sequential":
        passes = []
        for copy in COPIES[:copies]:
            passes.append(Pass(f"{label}-{copy}", copy, env, work, *clear_cache, suite=suite))
            passes[-1].wait()
    else:
        extra = ("--poolaware-share", "off" if case == "pair-no-share" else "auto", *clear_cache)
        named = COPIES[:copies] if case != "pair-killed" else COPIES[:2]
        passes = [Pass(f"{label}-{c}", c, env, work, *extra, suite=suite) for c in named]
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


@contextlib.contextmanager
def cpu_hog(processes: int) -> Iterator[None]:
    """``processes`` busy loops (``yes``) beside what runs inside."""
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(processes)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


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
        "reruns": max(r.reruns for r in rounds),
        "server_peak": max(r.server_peak for r in rounds),
        "exit_codes": [c for r in rounds for c in r.exit_codes],
        "budgets": sorted({b for r in rounds for b in r.budgets}),
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Shared server: {report['suite']} suite x{report['copies']}, W={WORKERS} each, one role, "
        f"{report['rounds']} interleaved rounds "
        + (
            "(every run cold: its cache cleared); "
            if report.get("cold")
            else "(every case but learned-cold warm); "
        )
        + (f"{report['hog']} busy processes beside them; " if report.get("hog") else "")
        + f"machine {report['machine']}.",
        "",
        "| case | wall s (median) | rounds | passed | failed | errors | conn errors "
        "| refusals | reruns | server peak |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["cases"]:
        lines.append(
            f"| {row['case']} | {row['wall']:.1f} | {row['walls']} | {row['passed']} "
            f"| {row['failed']} | {row['errors']} | {row['conn_errors']} | {row['refusals']} "
            f"| {row.get('reruns', 'n/a')} | {row['server_peak']} |"
        )
    lines += ["", "Budgets the runs' reports gave:", ""]
    lines += [f"- {row['case']}: {'; '.join(row['budgets']) or 'n/a'}" for row in report["cases"]]
    ratio = report.get("pair_over_sequential")
    if ratio is not None:
        lines += ["", f"pair / sequential: {ratio} (median of per-round ratios)"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--suite", choices=sorted(SUITES), default="demo")
    parser.add_argument("--copies", type=int, choices=(2, 3), default=2)
    parser.add_argument("--hog", type=int, default=0, help="busy processes beside the rounds")
    parser.add_argument("--cold", action="store_true", help="every run clears its cache")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or args.rounds < 1:
        parser.error(f"--cases from {', '.join(CASES)}; --rounds >= 1")
    from poolaware_testserver import postgres_dsn

    out: Path = args.out
    work = (out / "work-shared").resolve()
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "suite": args.suite,
        "copies": args.copies,
        "hog": args.hog,
        "cold": args.cold,
    }
    with postgres_dsn() as admin_dsn, demo_role(admin_dsn) as (role, dsn):
        report["machine"] = machine_info(admin_dsn)
        env = pool_env(dsn, pythonpath=HERE)
        learned, remote = (learned_env(dsn), learned_suite(work)), suite_copy(work, "remote")
        if not args.cold and any(not case.startswith("learned") for case in cases):
            for copy in COPIES[: args.copies]:  # learn first: all but learned-cold run warm
                warm_up = Pass(
                    f"warm-up-{copy}", copy, env, work, "--cache-clear", suite=SUITES[args.suite]
                )
                warm_up.wait()
        rounds: dict[str, list[Figures]] = {case: [] for case in cases}
        with cpu_hog(args.hog):
            for round_ in range(args.rounds):
                for case in cases:
                    print(f"[shared] {case} {round_ + 1}/{args.rounds} ...", file=sys.stderr)
                    with PeakMonitor(admin_dsn, role) as peak:
                        figures = run_case(
                            case,
                            env,
                            work,
                            peak,
                            learned,
                            remote,
                            suite=SUITES[args.suite],
                            copies=args.copies,
                            cold=args.cold,
                        )
                        rounds[case].append(figures)
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
