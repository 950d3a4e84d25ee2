"""Side-by-side benchmarks of the demo suite under each way of running it, in one invocation.

    python benchmarks/run.py [--only NAME[,NAME...]] [--out DIR] [--suite demo|inventory]
                             [--rounds N]

One PostgreSQL (POOLAWARE_DSN, a superuser DSN, or a throwaway server), one role limited to
ROLE_LIMIT connections, and every mode in a fresh pytest subprocess, so the ratios compare
runs made minutes apart on the same machine. Writes DIR/latest.md and DIR/latest.json.
``--suite inventory`` runs the modes on ``benchmarks/inventory`` (a suite of the demo's
shape whose serial lane is a quarter of its work) instead of the demo, and writes
DIR/latest_inventory.md and .json; the other benchmarks do not use a suite, so they only
run when named in ``--only``.
A mode that cannot run (say ``--dist poolaware`` before the scheduler exists) is reported
as failed with the tail of its output, and the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
SUITE: Final = HERE.parent / "demo" / "suite"
#: The suites the modes can run, by ``--suite``: the demo, and one of its shape whose
#: serial lane is not most of the work (so overlapping it with the fan-out pays off).
SUITES: Final = {"demo": SUITE, "inventory": HERE / "inventory"}
DEFAULT_SUITE: Final = "demo"
#: A suite that opens its connections without SQLAlchemy (psycopg, psycopg_pool, asyncpg).
RAW_SUITE: Final = HERE / "rawdrivers"
DEFAULT_OUT: Final = HERE / "results"

WORKERS: Final = 4
ROLE_LIMIT: Final = 16
POOL_SIZE: Final = 5
MAX_OVERFLOW: Final = 10
#: The budget the LB assumes: what poolaware defaults to (PG_POOL_SIZE + PG_MAX_OVERFLOW).
BUDGET: Final = POOL_SIZE + MAX_OVERFLOW
ROLE_PREFIX: Final = "poolaware_bench"
ENV_DSN: Final = "POOLAWARE_DSN"

#: How often the monitor thread counts the role's connections in pg_stat_activity.
SAMPLE_INTERVAL: Final = 0.02
#: A pass that runs longer than this is killed and reported as failed (a hung scheduler).
PASS_TIMEOUT: Final = 600.0
#: Lines of output kept for a pass that could not run.
TAIL_LINES: Final = 15
#: pytest exit codes meaning "it ran": all passed, or some tests failed.
RAN_EXIT_CODES: Final = (0, 1)
#: Our exit status when no server could be had (what to install or set is printed).
EXIT_NO_SERVER: Final = 2
#: Failure text marking a connection error (server limit or client pool limit).
CONNECTION_ERROR: Final = re.compile(
    r"53300|too many connections|too many clients|QueuePool limit", re.IGNORECASE
)
#: junitxml properties written by connprobe.py (kept in sync by hand: it is imported by pytest).
PEAK_PROPERTY: Final = "bench_peak_connections"
SERIAL_PROPERTY: Final = "bench_serial_only"

OVERHEAD_TESTS: Final = 3000
OVERHEAD_MODULES: Final = 30
OVERHEAD_WORKERS: Final = 2
OVERHEAD_ROUNDS: Final = 5
#: Rounds of the demo modes, interleaved (every mode once per round); medians are shown.
#: The default of ``--rounds``.
DEMO_ROUNDS: Final = 3
RAW_ROUNDS: Final = 3
NOMARKERS_TESTS: Final = 2000
NOMARKERS_MODULES: Final = 20
NOMARKERS_WORKERS: Final = WORKERS
NOMARKERS_ROUNDS: Final = 5
#: Budget for the nomarkers run: far above what it uses, so only scheduling cost shows.
NOMARKERS_BUDGET: Final = 100


@dataclass(frozen=True)
class Mode:
    """A way of running the demo suite: one or more pytest passes whose walls add up."""

    name: str
    passes: tuple[tuple[str, ...], ...]
    cache: str
    clear_cache: bool = True
    #: Reads and rewrites ``HISTORY_FILE`` (``--poolaware-history``) and keeps no cache:
    #: a fresh clone with the team's committed history file.
    history: bool = False


DIST = ("-n", str(WORKERS), "--dist")
#: The harness samples the server itself; the plugin's own monitor would add a
#: connection and a thread to the poolaware runs only.
NO_MONITOR = ("--poolaware-monitor", "off")
DEMO_MODES: Final = (
    Mode("serial", (("-n", "0", "-p", "connprobe"),), "serial"),
    Mode("load", ((*DIST, "load"),), "load"),
    Mode("worksteal", ((*DIST, "worksteal"),), "worksteal"),
    Mode("loadgroup", ((*DIST, "loadgroup"),), "loadgroup"),
    Mode(
        "two-pass",
        (("-m", "serial_only", "-n", "0"), ("-m", "not serial_only", *DIST, "load")),
        "two-pass",
    ),
    Mode("poolaware-cold", ((*DIST, "poolaware", *NO_MONITOR),), "poolaware"),
    Mode("poolaware-warm", ((*DIST, "poolaware", *NO_MONITOR),), "poolaware", clear_cache=False),
    # What the warm run would take if its processes ended with the interpreter's final
    # garbage collections, as every other mode's do: shows how much fast exit is worth.
    Mode(
        "poolaware-warm-gc-exit",
        ((*DIST, "poolaware", *NO_MONITOR, "--poolaware-fast-exit", "false"),),
        "poolaware",
        clear_cache=False,
    ),
    # And if every worker kept the same CPU priority: shows what the niceness is worth.
    Mode(
        "poolaware-warm-same-nice",
        ((*DIST, "poolaware", *NO_MONITOR, "--poolaware-fanout-nice", "0"),),
        "poolaware",
        clear_cache=False,
    ),
    # A fresh clone (cache cleared) with only the history file a team commits: seeded by
    # one run before the rounds, then read and rewritten by each round's run.
    Mode("poolaware-history", ((*DIST, "poolaware", *NO_MONITOR),), "history", history=True),
)
#: The history file of ``poolaware-history`` (in the work directory).
HISTORY_FILE: Final = "poolaware-history.json"
EXTRA_BENCHMARKS: Final = ("overhead", "nomarkers", "rawdrivers")
ALL_NAMES: Final = tuple(m.name for m in DEMO_MODES) + EXTRA_BENCHMARKS


@dataclass
class Outcome:
    """What one mode (or one pass of it) did."""

    name: str
    ran: bool = True
    wall: float = 0.0
    #: Wall minus pytest's session time (junitxml testsuite time): interpreter and plugin start.
    startup: float = 0.0
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    conn_errors: int = 0
    server_peak: int | None = None
    exit_codes: list[int] = field(default_factory=list)
    tail: str = ""
    wall_over_lb: float | None = None
    #: Wall of each round, in order (a mode run in rounds shows the median as ``wall``).
    walls: list[float] = field(default_factory=list)
    #: Tests planned with learned data (the run report's ``run.learned``; history modes).
    learned: int | None = None
    #: From the first test's start to the last one's end (the run report's ``run.wall``;
    #: poolaware modes): the wall the lower bound is for, start-up left out.
    tests_wall: float | None = None
    tests_over_lb: float | None = None

    def add(self, other: Outcome) -> None:
        """Fold a later pass into this one (two-pass: walls and counts add up)."""
        self.ran = self.ran and other.ran
        self.wall += other.wall
        self.startup += other.startup
        for name in ("passed", "failed", "errors", "skipped", "conn_errors"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.server_peak is not None:
            self.server_peak = max(self.server_peak or 0, other.server_peak)
        self.exit_codes += other.exit_codes
        self.tail = self.tail or other.tail


def _median_of(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def fold_rounds(rounds: Sequence[Outcome]) -> Outcome:
    """One line for a mode run in rounds: median wall and startup, the worst counts."""
    ran = [o for o in rounds if o.ran]
    first = (ran or list(rounds))[0]
    peaks = [o.server_peak for o in rounds if o.server_peak is not None]
    return Outcome(
        first.name,
        ran=len(ran) == len(rounds),
        wall=statistics.median(o.wall for o in ran) if ran else 0.0,
        startup=statistics.median(o.startup for o in ran) if ran else 0.0,
        passed=min(o.passed for o in rounds),
        failed=max(o.failed for o in rounds),
        errors=max(o.errors for o in rounds),
        skipped=max(o.skipped for o in rounds),
        conn_errors=max(o.conn_errors for o in rounds),
        server_peak=max(peaks) if peaks else None,
        exit_codes=[c for o in rounds for c in o.exit_codes],
        tail=next((o.tail for o in rounds if o.tail), ""),
        tests_wall=_median_of([o.tests_wall for o in ran]),
        walls=[round(o.wall, 2) for o in rounds],
        learned=min((o.learned for o in rounds if o.learned is not None), default=None),
    )


@dataclass(frozen=True)
class TestCase:
    """One junitxml test case: duration, outcome, connection error, connprobe properties."""

    duration: float
    outcome: str
    conn_error: bool
    peak: int | None
    serial: bool


def read_junit(path: Path) -> tuple[float, list[TestCase]]:
    """pytest's session time and the test cases of a junitxml file (xunit1 or xunit2)."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    session = float(suite.get("time", "0")) if suite is not None else 0.0
    cases = []
    for case in root.iter("testcase"):
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors"}.get(child.tag, child.tag)
                text = f"{child.get('message', '')}\n{child.text or ''}"
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        peak = props.get(PEAK_PROPERTY)
        cases.append(
            TestCase(
                duration=float(case.get("time", "0")),
                outcome=outcome,
                conn_error=outcome in ("failed", "errors") and bool(CONNECTION_ERROR.search(text)),
                peak=int(peak) if peak is not None else None,
                serial=props.get(SERIAL_PROPERTY) == "1",
            )
        )
    return session, cases


class PeakMonitor:
    """Background sampler of the role's server-side connections (pg_stat_activity)."""

    def __init__(self, admin_dsn: str, role: str) -> None:
        self._dsn, self._role = admin_dsn, role
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-monitor", daemon=True)
        self.peak = 0

    def _run(self) -> None:
        import psycopg

        with psycopg.connect(self._dsn, autocommit=True) as conn:
            query = "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
            while True:
                row = conn.execute(query, (self._role,)).fetchone()
                self.peak = max(self.peak, int(row[0]) if row else 0)
                if self._stop.wait(SAMPLE_INTERVAL):
                    return

    def __enter__(self) -> PeakMonitor:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run_pytest(
    label: str, args: Sequence[str], env: dict[str, str], work: Path
) -> tuple[int | None, float, str, Path]:
    """Run pytest in its own session; return (exit code or None on timeout, wall, log, junit)."""
    junit = work / f"{label}.xml"
    junit.unlink(missing_ok=True)
    log = work / f"{label}.log"
    command = [sys.executable, "-m", "pytest", *args, "-q", f"--junitxml={junit}"]
    with log.open("w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code: int | None = process.wait(timeout=PASS_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the session we started: xdist workers too
            process.wait()
            code = None
        wall = time.perf_counter() - start
    return code, wall, "\n".join(log.read_text().splitlines()[-TAIL_LINES:]), junit


def run_pass(
    label: str,
    args: Sequence[str],
    env: dict[str, str],
    work: Path,
    monitor: tuple[str, str] | None,
) -> tuple[Outcome, list[TestCase]]:
    """One pytest pass, with the server peak sampled while it runs when ``monitor`` is set."""
    sampler = PeakMonitor(*monitor) if monitor else None
    if sampler:
        with sampler:
            code, wall, tail, junit = run_pytest(label, args, env, work)
    else:
        code, wall, tail, junit = run_pytest(label, args, env, work)
    outcome = Outcome(label, wall=wall, server_peak=sampler.peak if sampler else None)
    outcome.exit_codes.append(-1 if code is None else code)
    if code not in RAN_EXIT_CODES or not junit.exists():
        outcome.ran = False
        outcome.tail = tail if code is not None else f"timed out after {PASS_TIMEOUT:g} s\n{tail}"
        return outcome, []
    session, cases = read_junit(junit)
    outcome.startup = max(0.0, wall - session)
    for case in cases:
        if case.outcome in ("passed", "failed", "errors", "skipped"):
            setattr(outcome, case.outcome, getattr(outcome, case.outcome) + 1)
        outcome.conn_errors += case.conn_error
    return outcome, cases


def run_mode(
    mode: Mode, suite: Path, env: dict[str, str], work: Path, monitor: tuple[str, str] | None
) -> tuple[Outcome, list[TestCase]]:
    """All passes of a mode, with the mode's own cache directory."""
    total: Outcome | None = None
    all_cases: list[TestCase] = []
    cache = f"cache_dir={work / ('cache-' + mode.cache)}"
    for index, extra in enumerate(mode.passes):
        label = mode.name if len(mode.passes) == 1 else f"{mode.name}.{index + 1}"
        args = [str(suite), "-o", cache, *(["--cache-clear"] if mode.clear_cache else []), *extra]
        report = work / f"{label}-report.json" if "poolaware" in extra else None
        if report is not None:
            args.append(f"--poolaware-report={report}")
        if mode.history:
            history = f"--poolaware-history={work / HISTORY_FILE}"
            args += [history, "--poolaware-store-history"]
        outcome, cases = run_pass(label, args, env, work, monitor)
        if report is not None and outcome.ran:
            run = json.loads(report.read_text())["run"]
            outcome.tests_wall = run["wall"]
            outcome.learned = run["learned"] if mode.history else None
        all_cases += cases
        if total is None:
            total = outcome
        else:
            total.add(outcome)
    assert total is not None
    total.name = mode.name
    return total, all_cases


def run_round(
    modes: Sequence[Mode],
    label: str,
    suite: Path,
    env: dict[str, str],
    work: Path,
    monitor: tuple[str, str],
    runs: dict[str, list[Outcome]],
) -> None:
    """One round of interleaved modes; each outcome joins its mode's list in ``runs``
    (``label`` names the passes, ``{}`` standing for the mode)."""
    for mode in modes:
        named = dataclasses.replace(mode, name=label.format(mode.name))
        outcome, _ = run_mode(named, suite, env, work, monitor)
        runs[mode.name].append(outcome)


def demo_lower_bound(cases: Sequence[TestCase], workers: int, budget: int) -> dict[str, Any]:
    """The run summary's lower bound (``pytest_poolaware.planning.lowerbound``, docs/design.md) over
    the serial run's test cases, with each lane's peak connections."""
    from pytest_poolaware.planning.lowerbound import lower_bound

    serial = [c for c in cases if c.serial]
    fanout = [c for c in cases if not c.serial]
    bound = lower_bound(
        workers,
        budget,
        [(c.duration, c.peak or 0) for c in serial],
        [(c.duration, c.peak or 0) for c in fanout],
    )
    return {
        **dataclasses.asdict(bound),
        "value": bound.value,
        "binding": bound.binding,
        "peak_by_lane": {
            "serial_only": max((c.peak or 0 for c in serial), default=0),
            "other": max((c.peak or 0 for c in fanout), default=0),
        },
    }


def pool_env(dsn: str, pythonpath: Path | None = None) -> dict[str, str]:
    """The environment for a demo pass: the role's DSN and the pool sizes of the LB's budget."""
    env = dict(os.environ)
    env.update({ENV_DSN: dsn, "PG_POOL_SIZE": str(POOL_SIZE), "PG_MAX_OVERFLOW": str(MAX_OVERFLOW)})
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return env


def write_suite(root: Path, modules: int, per_module: int, test: str, header: str = "") -> Path:
    """Generate ``modules`` files of ``per_module`` tests each (``test`` is parametrized by i)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pytest.ini").write_text("[pytest]\n")  # its own rootdir
    for index in range(modules):
        (root / f"test_gen_{index:03d}.py").write_text(
            f"import pytest\n{header}\n\n@pytest.mark.parametrize('i', range({per_module}))\n"
            f"{test}\n"
        )
    return root


NOMARKERS_HEADER: Final = """
import os
from sqlalchemy import text
from pytest_poolaware.engine import make_engine


@pytest.fixture(scope="module")
def engine():
    engine = make_engine(os.environ["POOLAWARE_DSN"])
    yield engine
    engine.dispose()
"""
NOMARKERS_TEST: Final = """def test_query(i, engine):
    with engine.connect() as conn:
        assert conn.execute(text("SELECT :i"), {"i": i}).scalar() == i
"""
OVERHEAD_TEST: Final = "def test_trivial(i):\n    assert i >= 0\n"


def benchmark_overhead(work: Path) -> dict[str, Any]:
    """3000 trivial tests, ``-n 2`` load vs poolaware, interleaved rounds, medians."""
    suite = write_suite(
        work / "overhead-suite", OVERHEAD_MODULES, OVERHEAD_TESTS // OVERHEAD_MODULES, OVERHEAD_TEST
    )
    env = dict(os.environ)
    walls: dict[str, list[float]] = {"load": [], "poolaware": []}
    failures: dict[str, str] = {}
    for round_ in range(OVERHEAD_ROUNDS):
        for dist in walls:
            args = [
                str(suite),
                "-o",
                f"cache_dir={work / ('cache-overhead-' + dist)}",
                "-n",
                str(OVERHEAD_WORKERS),
                "--dist",
                dist,
                *(NO_MONITOR if dist == "poolaware" else ()),
            ]
            if round_ == 0:
                args.append("--cache-clear")
            outcome, _ = run_pass(f"overhead-{dist}-{round_}", args, env, work, None)
            if outcome.ran and outcome.passed == OVERHEAD_TESTS:
                walls[dist].append(outcome.wall)
            else:
                failures[dist] = outcome.tail or f"{outcome.passed} passed, {outcome.failed} failed"
    medians = {d: statistics.median(w) if w else None for d, w in walls.items()}
    ratio = (
        medians["poolaware"] / medians["load"] if medians["poolaware"] and medians["load"] else None
    )
    return {
        "tests": OVERHEAD_TESTS,
        "workers": OVERHEAD_WORKERS,
        "walls": walls,
        "median": medians,
        "ratio_poolaware_over_load": ratio,
        "failures": failures,
    }


def benchmark_nomarkers(work: Path, admin_dsn: str) -> dict[str, Any]:
    """2000 one-query DB tests, no markers, unlimited role, large budget: load vs poolaware
    cold and warm, in interleaved rounds; the medians are compared."""
    from poolaware_testserver import create_role, drop_role

    per_module = NOMARKERS_TESTS // NOMARKERS_MODULES
    suite = write_suite(
        work / "nomarkers-suite", NOMARKERS_MODULES, per_module, NOMARKERS_TEST, NOMARKERS_HEADER
    )
    role = f"{ROLE_PREFIX}_nomarkers_{os.getpid()}"
    dsn = create_role(admin_dsn, role)
    try:
        env = pool_env(dsn)
        budget = ("--pool-budget", str(NOMARKERS_BUDGET), *NO_MONITOR)
        runs: dict[str, list[Outcome]] = {
            "load": [],
            "poolaware-cold": [],
            "poolaware-warm": [],
        }
        for round_ in range(NOMARKERS_ROUNDS):
            # Interleaved, so a noisy minute hits every mode alike; cold/warm share a cache.
            modes = (
                Mode("load", ((*DIST, "load"),), f"nm-load-{round_}"),
                Mode("poolaware-cold", ((*DIST, "poolaware", *budget),), f"nm-pa-{round_}"),
                Mode("poolaware-warm", ((*DIST, "poolaware", *budget),), f"nm-pa-{round_}", False),
            )
            run_round(modes, f"nomarkers-{{}}-{round_}", suite, env, work, (admin_dsn, role), runs)
        results = {name: dataclasses.asdict(fold_rounds(o)) for name, o in runs.items()}
    finally:
        drop_role(admin_dsn, role)
    load_wall = results["load"]["wall"] if results["load"]["ran"] else None
    for result in results.values():
        result["ratio_over_load"] = (
            result["wall"] / load_wall if load_wall and result["ran"] else None
        )
    return {
        "tests": NOMARKERS_TESTS,
        "workers": NOMARKERS_WORKERS,
        "budget": NOMARKERS_BUDGET,
        "modes": results,
    }


def benchmark_rawdrivers(work: Path, admin_dsn: str) -> dict[str, Any]:
    """The raw-driver suite against the demo's limited role and budget: load against
    poolaware cold and warm, in interleaved rounds (connection errors and server peak)."""
    with demo_role(admin_dsn) as (role, dsn):
        env = pool_env(dsn)
        runs: dict[str, list[Outcome]] = {"load": [], "poolaware-cold": [], "poolaware-warm": []}
        for round_ in range(RAW_ROUNDS):
            modes = (
                Mode("load", ((*DIST, "load"),), f"raw-load-{round_}"),
                Mode("poolaware-cold", ((*DIST, "poolaware", *NO_MONITOR),), f"raw-pa-{round_}"),
                Mode(
                    "poolaware-warm",
                    ((*DIST, "poolaware", *NO_MONITOR),),
                    f"raw-pa-{round_}",
                    clear_cache=False,
                ),
            )
            run_round(
                modes, f"rawdrivers-{{}}-{round_}", RAW_SUITE, env, work, (admin_dsn, role), runs
            )
    return {
        "workers": WORKERS,
        "budget": BUDGET,
        "role_limit": ROLE_LIMIT,
        "modes": {name: dataclasses.asdict(fold_rounds(o)) for name, o in runs.items()},
    }


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages: the machine is shared, so say how busy it was."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(admin_dsn: str | None) -> dict[str, Any]:
    """Enough to tell two result files' machines apart."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": loadavg(),
    }
    if admin_dsn:
        import psycopg

        with psycopg.connect(admin_dsn) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            info["postgres"] = row[0] if row else None
    return info


@contextmanager
def demo_role(admin_dsn: str) -> Iterator[tuple[str, str]]:
    """The limited role the demo modes share, dropped afterwards; yields (role, its DSN)."""
    from poolaware_testserver import create_role, drop_role

    role = f"{ROLE_PREFIX}_{os.getpid()}"
    dsn = create_role(admin_dsn, role, connection_limit=ROLE_LIMIT)
    try:
        yield role, dsn
    finally:
        drop_role(admin_dsn, role)


def headline(tail: str) -> str:
    """The line of a failed pass's output that says why: the last one naming an error."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1].replace("|", "/")


def _fmt(value: float | int | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


#: The demo ratios the project's targets are stated in: (numerator, denominator).
DEMO_RATIOS: Final = (
    ("poolaware-warm", "two-pass"),
    ("poolaware-cold", "two-pass"),
    ("poolaware-warm-gc-exit", "two-pass"),
    ("poolaware-warm-same-nice", "two-pass"),
    ("poolaware-history", "poolaware-warm"),
)


def demo_ratios(rounds: dict[str, list[Outcome]]) -> dict[str, dict[str, Any]]:
    """Per-round wall ratios (each pair ran minutes apart at most) and their median."""
    ratios = {}
    for top, bottom in DEMO_RATIOS:
        if top not in rounds or bottom not in rounds:
            continue
        pairs = [
            a.wall / b.wall
            for a, b in zip(rounds[top], rounds[bottom], strict=True)
            if a.ran and b.ran and b.wall > 0
        ]
        ratios[f"{top} / {bottom}"] = {
            "rounds": [round(r, 3) for r in pairs],
            "median": statistics.median(pairs) if pairs else None,
        }
    return ratios


def render_markdown(report: dict[str, Any]) -> str:
    """latest.md: the machine, the LB, the modes table, overhead and nomarkers."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"# Benchmarks {report['timestamp']}",
        "",
        f"Machine: {m['cpu_count']} CPUs, Python {m['python']}, PostgreSQL "
        f"{m.get('postgres', '?')}; load average at start {m.get('loadavg_at_start')}, "
        f"at end {report.get('loadavg_at_end')}.",
        f"{report['suite'].capitalize()} suite, W={s['workers']} workers, "
        f"role CONNECTION LIMIT {s['role_limit']}, "
        f"PG_POOL_SIZE={s['pool_size']} PG_MAX_OVERFLOW={s['max_overflow']} "
        f"(budget B={s['budget']}); server peak sampled every {s['sample_interval']} s.",
        "",
    ]
    lb = report.get("lower_bound")
    if lb:
        lines += [
            f"LB = {lb['value']:.1f} s = max(sum_S p {lb['serial']:.1f}, "
            f"max p {lb['longest']:.1f}, sum p/W {lb['workers']:.1f}, "
            f"sum min(c,B)*p/B {lb['connections']:.1f}, "
            f"sum_S p + sum_X min(c,B)*p/B {lb.get('conflicts', 0.0):.1f}); "
            "from the serial run. Peak c: "
            f"serial_only {lb['peak_by_lane']['serial_only']}, others "
            f"{lb['peak_by_lane']['other']}. wall includes startup (shown apart); "
            "wall/LB uses wall. tests wall: from the first test's start to the last one's "
            "end (poolaware's run report), the wall the bound is for; tests/LB uses it.",
            "",
        ]
    if report["modes"]:
        lines += [
            f"Each mode ran {s.get('rounds', DEMO_ROUNDS)} times, interleaved; "
            "wall and startup are medians, "
            "the counts the worst round's.",
            "",
            "| mode | wall s | rounds | startup s | passed | failed | errors | conn errors "
            "| server peak | wall/LB | tests wall s | tests/LB |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for o in report["modes"]:
        if not o["ran"]:
            lines.append(
                f"| {o['name']} | did not run (exit {o['exit_codes']}): "
                f"`{headline(o['tail'])}` | | | | | | | | | | |"
            )
            continue
        lines.append(
            f"| {o['name']} | {o['wall']:.1f} | {o['walls']} | {o['startup']:.1f} "
            f"| {o['passed']} "
            f"| {o['failed']} | {o['errors']} "
            f"| {o['conn_errors']} | {_fmt(o['server_peak'], 'd')} "
            f"| {_fmt(o['wall_over_lb'], '.2f')} "
            f"| {_fmt(o.get('tests_wall'), '.2f')} | {_fmt(o.get('tests_over_lb'), '.2f')} |"
        )
    learned = [o for o in report["modes"] if o["ran"] and o.get("learned") is not None]
    for o in learned:
        lines += [
            "",
            f"{o['name']}: planned with learned data for at least {o['learned']} tests "
            "in every round (the run report's `run.learned`), with no pytest cache.",
        ]
    for name, ratio in report.get("ratios", {}).items():
        lines += [
            "",
            f"{name}: {_fmt(ratio['median'], '.2f')} (median of per-round ratios "
            f"{ratio['rounds']})",
        ]
    overhead = report.get("overhead")
    if overhead:
        med = overhead["median"]
        lines += [
            "",
            f"Overhead ({overhead['tests']} trivial tests, -n {overhead['workers']}, median of "
            f"{OVERHEAD_ROUNDS} interleaved rounds): load {_fmt(med['load'], '.2f')} s, "
            f"poolaware {_fmt(med['poolaware'], '.2f')} s, ratio "
            f"{_fmt(overhead['ratio_poolaware_over_load'], '.2f')}. Rounds: "
            + "; ".join(f"{d} {[round(w, 2) for w in ws]}" for d, ws in overhead["walls"].items()),
        ]
        for dist, tail in overhead["failures"].items():
            lines.append(f"  {dist} failed: `{headline(tail)}`")
    nomarkers = report.get("nomarkers")
    if nomarkers:
        lines += [
            "",
            f"No markers ({nomarkers['tests']} one-query DB tests, -n {nomarkers['workers']}, "
            f"unlimited role, --pool-budget {nomarkers['budget']}; median of "
            f"{NOMARKERS_ROUNDS} interleaved rounds, each poolaware-warm after its own cold run):",
            "",
            "| mode | wall s (median) | rounds | passed | failed | errors | server peak "
            "| ratio to load |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for name, o in nomarkers["modes"].items():
            if not o["ran"]:
                lines.append(f"| {name} | did not run: `{headline(o['tail'])}` | | | | | | |")
                continue
            lines.append(
                f"| {name} | {o['wall']:.1f} | {o['walls']} | {o['passed']} | {o['failed']} "
                f"| {o['errors']} "
                f"| {_fmt(o['server_peak'], 'd')} | {_fmt(o['ratio_over_load'], '.2f')} |"
            )
    raw = report.get("rawdrivers")
    if raw:
        lines += [
            "",
            f"Raw drivers (psycopg, psycopg_pool, asyncpg; no SQLAlchemy), -n {raw['workers']}, "
            f"role CONNECTION LIMIT {raw['role_limit']}, budget {raw['budget']}; "
            f"{RAW_ROUNDS} interleaved rounds, counts from the worst round:",
            "",
            "| mode | wall s (median) | passed | failed | errors | conn errors | server peak |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, o in raw["modes"].items():
            if not o["ran"]:
                lines.append(f"| {name} | did not run: `{headline(o['tail'])}` | | | | | |")
                continue
            lines.append(
                f"| {name} | {o['wall']:.1f} | {o['passed']} | {o['failed']} | {o['errors']} "
                f"| {o['conn_errors']} | {_fmt(o['server_peak'], 'd')} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated subset of: {', '.join(ALL_NAMES)} (LB needs serial); "
        f"default: all of them for the demo, the modes only for another suite",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where latest.md/json go")
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default=DEFAULT_SUITE,
        help="the suite the modes run (results of another than the demo go to "
        "latest_<suite>.md/json)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=DEMO_ROUNDS,
        help=f"interleaved rounds of the modes (default {DEMO_ROUNDS}; 1 for a smoke run)",
    )
    args = parser.parse_args(list(argv))
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.only is None:
        modes = [m.name for m in DEMO_MODES]
        args.only = ",".join(ALL_NAMES if args.suite == DEFAULT_SUITE else modes)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(ALL_NAMES))
    if unknown:
        parser.error(
            f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ALL_NAMES)}"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks, write the reports, print the Markdown."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from poolaware_testserver import ServerUnavailable, postgres_dsn

    out: Path = args.out
    suite: Path = SUITES[args.suite]
    stem = "latest" if args.suite == DEFAULT_SUITE else f"latest_{args.suite}"
    # Another suite's caches and history file apart from the demo's.
    work = out / "work" if args.suite == DEFAULT_SUITE else out / "work" / args.suite
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "suite": args.suite,
        "settings": {
            "workers": WORKERS,
            "role_limit": ROLE_LIMIT,
            "pool_size": POOL_SIZE,
            "max_overflow": MAX_OVERFLOW,
            "budget": BUDGET,
            "sample_interval": SAMPLE_INTERVAL,
            "rounds": args.rounds,
        },
        "modes": [],
    }
    with ExitStack() as server:
        try:
            admin_dsn = server.enter_context(postgres_dsn())
        except ServerUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_NO_SERVER
        report["machine"] = machine_info(admin_dsn)
        selected = [m for m in DEMO_MODES if m.name in args.only]
        if selected:
            with demo_role(admin_dsn) as (role, dsn):
                env = pool_env(dsn, pythonpath=HERE)
                serial_cases: list[TestCase] = []
                rounds: dict[str, list[Outcome]] = {mode.name: [] for mode in selected}
                (work / HISTORY_FILE).unlink(missing_ok=True)
                for mode in (m for m in selected if m.history):
                    print(
                        f"[bench] {mode.name}: seeding {HISTORY_FILE} ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    run_mode(mode, suite, env, work, (admin_dsn, role))
                for round_ in range(args.rounds):
                    # Interleaved, so a noisy minute on this shared machine hits every
                    # mode alike; each mode keeps its own cache (warm follows cold).
                    for mode in selected:
                        print(
                            f"[bench] {mode.name} {round_ + 1}/{args.rounds} ...",
                            file=sys.stderr,
                            flush=True,
                        )
                        outcome, cases = run_mode(mode, suite, env, work, (admin_dsn, role))
                        if mode.name == "serial" and outcome.ran and not serial_cases:
                            serial_cases = cases
                        rounds[mode.name].append(outcome)
                report["modes"] = [fold_rounds(r) for r in rounds.values()]
                report["ratios"] = demo_ratios(rounds)
                if serial_cases:
                    lb = demo_lower_bound(serial_cases, WORKERS, BUDGET)
                    report["lower_bound"] = lb
                    for outcome in report["modes"]:
                        if outcome.ran and lb["value"] > 0:
                            outcome.wall_over_lb = outcome.wall / lb["value"]
                            if outcome.tests_wall is not None:
                                outcome.tests_over_lb = outcome.tests_wall / lb["value"]
        report["modes"] = [dataclasses.asdict(o) for o in report["modes"]]
        if "overhead" in args.only:
            print("[bench] overhead ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="poolaware-overhead-") as tmp:
                report["overhead"] = benchmark_overhead(Path(tmp))
        if "nomarkers" in args.only:
            print("[bench] nomarkers ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="poolaware-nomarkers-") as tmp:
                report["nomarkers"] = benchmark_nomarkers(Path(tmp), admin_dsn)
        if "rawdrivers" in args.only:
            print("[bench] rawdrivers ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="poolaware-rawdrivers-") as tmp:
                report["rawdrivers"] = benchmark_rawdrivers(Path(tmp), admin_dsn)
    report["loadavg_at_end"] = loadavg()
    markdown = render_markdown(report)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
