"""A large suite without markers against PostgreSQL: ``load`` against poolaware cold and warm.

    python benchmarks/markerless.py [--tests N] [--modules M] [--rounds R] [--out DIR]

What a new user tries first: thousands of tests with no markers, one database per xdist
worker, class-scoped fixtures, and modules that share process-wide state the way real
suites do (a registry that reader modules fill at import time and that later "cleanup"
modules change, so a reader's tests break when they run after such a module in one
process; under ``--dist load`` they never do). Each round runs, interleaved, ``load``,
poolaware cold (``--cache-clear``), then two warm runs on that cache (``--with-duration``
adds a warm ``--poolaware-order duration`` run, to show the risk that option names).
Every test's outcome is compared with ``load``'s in the same round; walls are medians of
the rounds and their ratios to ``load``. Writes DIR/markerless.md and DIR/markerless.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Final

import run as bench
from rounds import KEEP_ORDER, Run, run_interleaved

DEFAULT_TESTS: Final = 3000
DEFAULT_MODULES: Final = 60
DEFAULT_ROUNDS: Final = 3
WORKERS: Final = bench.WORKERS
#: Far above what the suite holds (one pool per worker), so only scheduling shows.
BUDGET: Final = 100
#: Every MODULE_PERIOD modules: one reader (fills the registry at import time), and
#: CLEANUP_DISTANCE modules later one cleanup module that takes the reader's entry out.
MODULE_PERIOD: Final = 10
READER_SLOT: Final = 2
CLEANUP_DISTANCE: Final = 5
#: Every CLASS_PERIOD-th module groups its tests in a class with a class-scoped table.
CLASS_PERIOD: Final = 4
#: Every HEAVY_PERIOD-th module's tests sleep HEAVY_SLEEP on the server, the others a
#: few milliseconds by position: durations differ, as learned data would show.
HEAVY_PERIOD: Final = 13
HEAVY_SLEEP: Final = 0.02
LIGHT_SLEEPS: Final = (0.0, 0.001, 0.002, 0.004)

CONFTEST: Final = """
import os
import pytest
from psycopg.conninfo import conninfo_to_dict
from pytest_poolaware.engine import make_engine


@pytest.fixture(scope="session")
def engine():
    # One database per xdist worker, made by the harness: <role>_<worker>.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    params = conninfo_to_dict(os.environ["POOLAWARE_DSN"])
    params["dbname"] = f"{params['user']}_{worker}"
    engine = make_engine("postgresql+psycopg://", connect_args=params)
    yield engine
    engine.dispose()
"""

REGISTRY: Final = """
#: Process-wide state, filled at import time by the reader modules.
ACCEPTED = {"base"}
"""

READER: Final = """
import registry
registry.ACCEPTED.add("{name}")


@pytest.mark.parametrize("i", range({count}))
def test_accepts(i, engine):
    with engine.connect() as conn:
        conn.execute(text("select pg_sleep(:s)"), {{"s": {sleep}}})
    assert "{name}" in registry.ACCEPTED
"""

CLEANUP: Final = """
import registry


@pytest.mark.parametrize("i", range({count}))
def test_cleanup(i, engine):
    with engine.connect() as conn:
        conn.execute(text("select pg_sleep(:s)"), {{"s": {sleep}}})
    registry.ACCEPTED.discard("{name}")
"""

CLASSY: Final = """
class TestTable:
    @pytest.fixture(scope="class")
    def table(self, engine):
        with engine.begin() as conn:
            conn.execute(text("create table if not exists {table} (n int)"))
        yield "{table}"
        with engine.begin() as conn:
            conn.execute(text("drop table {table}"))

    @pytest.mark.parametrize("i", range({count}))
    def test_row(self, i, table, engine):
        with engine.begin() as conn:
            conn.execute(text(f"insert into {{table}} values (:i)"), {{"i": i}})
            conn.execute(text("select pg_sleep(:s)"), {{"s": {sleep}}})
"""

PLAIN: Final = """
@pytest.mark.parametrize("i", range({count}))
def test_query(i, engine):
    with engine.connect() as conn:
        assert conn.execute(text("select :i, pg_sleep(:s)"), {{"i": i, "s": {sleep}}}).scalar() == i
"""


def write_suite(root: Path, tests: int, modules: int) -> list[str]:
    """The suite's files; returns the reader modules' registry names."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "conftest.py").write_text(CONFTEST)
    (root / "registry.py").write_text(REGISTRY)
    per_module = max(1, tests // modules)
    readers = []
    for m in range(modules):
        sleep = HEAVY_SLEEP if m % HEAVY_PERIOD == 0 else LIGHT_SLEEPS[m % len(LIGHT_SLEEPS)]
        fields = {"count": per_module, "sleep": sleep, "table": f"t_{m:03d}"}
        slot = m % MODULE_PERIOD
        if slot == READER_SLOT:
            body = READER.format(name=f"reader_{m:03d}", **fields)
            readers.append(f"reader_{m:03d}")
        elif slot == READER_SLOT + CLEANUP_DISTANCE and m >= CLEANUP_DISTANCE:
            body = CLEANUP.format(name=f"reader_{m - CLEANUP_DISTANCE:03d}", **fields)
        elif m % CLASS_PERIOD == 1:
            body = CLASSY.format(**fields)
        else:
            body = PLAIN.format(**fields)
        header = "import pytest\nfrom sqlalchemy import text\n"
        (root / f"test_m{m:03d}.py").write_text(header + body)
    return readers


@contextmanager
def worker_databases(admin_dsn: str, role: str, workers: int) -> Iterator[str]:
    """A role and one database per worker that it owns; the role's DSN."""
    import psycopg
    from psycopg import sql

    from poolaware_testserver import create_role, drop_role

    dsn = create_role(admin_dsn, role)
    names = [f"{role}_gw{n}" for n in range(workers)]
    try:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            for name in names:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(name), sql.Identifier(role)
                    )
                )
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            for name in names:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        drop_role(admin_dsn, role)


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    args: tuple[str, ...]
    #: Cache shared with the previous mode of the round (warm runs), else cleared.
    warm: bool = False


POOLAWARE = ("--dist", "poolaware", "--pool-budget", str(BUDGET), *bench.NO_MONITOR)
MODES: Final = (
    Mode("load", ("--dist", "load")),
    Mode("poolaware-cold", POOLAWARE),
    Mode("poolaware-warm-1", POOLAWARE, warm=True),
    Mode("poolaware-warm-2", POOLAWARE, warm=True),
)
#: The mode every run's outcomes are compared with, test by test.
REFERENCE: Final = MODES[0].name
DURATION_MODE: Final = Mode(
    "poolaware-duration-warm", (*POOLAWARE, "--poolaware-order", "duration"), warm=True
)


def run_rounds(
    suite: Path, work: Path, env: dict[str, str], modes: Sequence[Mode], rounds: int
) -> dict[str, Any]:
    """Every mode once a round, load's and poolaware's each on a cache of their own."""

    def run_of(mode: Mode, round_: int) -> Run:
        cache = work / ("cache-load" if mode.name == REFERENCE else "cache-poolaware")
        args = [str(suite), "-o", f"cache_dir={cache}", "-n", str(WORKERS), *KEEP_ORDER]
        args += mode.args
        if not mode.warm:
            args.append("--cache-clear")
        return Run(f"markerless-{mode.name}-{round_}", args)

    return run_interleaved(
        modes,
        REFERENCE,
        rounds,
        run_of,
        env,
        work,
        progress="markerless",
        reference_key="load",
        outcomes_summed=False,
    )


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Markerless suite: {report['tests']} tests in {report['modules']} modules, -n {WORKERS}, "
        f"one database per worker, --pool-budget {BUDGET}; {report['rounds']} interleaved "
        f"rounds (load average at start {report['loadavg_at_start']}, at end "
        f"{report['loadavg_at_end']}).",
        "",
        "| mode | wall s (median) | rounds | outcomes | differences from load | ratio to load |",
        "|---|---:|---|---|---:|---:|",
    ]
    for name, mode in report["modes"].items():
        median = f"{mode['median']:.1f}" if mode["median"] else "-"
        ratio = f"{mode['ratio_over_load']:.2f}" if mode["ratio_over_load"] else "-"
        tally = ", ".join(f"{k} {v}" for k, v in sorted(mode["outcomes"].items()))
        lines.append(
            f"| {name} | {median} | {mode['walls']} | {tally} "
            f"| {len(mode['differences_from_load'])} | {ratio} |"
        )
    for name, mode in report["modes"].items():
        for line in mode["differences_from_load"][:10]:
            lines.append(f"- {name}: {line}")
    for name, tail in report["failures"].items():
        lines.append(f"- {name} did not run:\n\n```\n{tail}\n```")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=DEFAULT_TESTS)
    parser.add_argument("--modules", type=int, default=DEFAULT_MODULES)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--with-duration", action="store_true", help="add a duration-order run")
    parser.add_argument("--out", type=Path, default=bench.DEFAULT_OUT)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if min(args.tests, args.modules, args.rounds) < 1:
        parser.error("--tests, --modules and --rounds must be positive")
    from poolaware_testserver import ServerUnavailable, postgres_dsn

    modes = (*MODES, DURATION_MODE) if args.with_duration else MODES
    report: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tests": (args.tests // args.modules) * args.modules,
        "modules": args.modules,
        "rounds": args.rounds,
        "loadavg_at_start": bench.loadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="poolaware-markerless-") as tmp:
        work = Path(tmp)
        suite = work / "suite"
        write_suite(suite, args.tests, args.modules)
        with ExitStack() as server:
            try:
                admin_dsn = server.enter_context(postgres_dsn())
            except ServerUnavailable as exc:
                print(f"error: {exc}", file=sys.stderr)
                return bench.EXIT_NO_SERVER
            role = f"{bench.ROLE_PREFIX}_markerless_{os.getpid()}"
            with worker_databases(admin_dsn, role, WORKERS) as dsn:
                report |= run_rounds(suite, work, bench.pool_env(dsn), modes, args.rounds)
    report["loadavg_at_end"] = bench.loadavg()
    markdown = render(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "markerless.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "markerless.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
