"""Run other projects' own test suites under ``--dist load`` and ``--dist poolaware``.

    python peers/run.py [--cache DIR] [--peer NAME] [--workers N] [PYTEST ARGS]

Our tests exercise the patterns we thought of; a popular project's suite exercises its
own. For each peer in :data:`PEERS`: its sdist, pinned on PyPI, is downloaded and
unpacked once into ``DIR`` (the suite comes with it) and installed here with what its
suite needs; then its slice of modules runs three times, each against a fresh throwaway
PostgreSQL (or ``$POOLAWARE_DSN``, a superuser DSN): ``-n N --dist load``, then
``--dist poolaware`` with an empty pytest cache (cold), then again on that cache (warm).
The outcomes are compared test by test with load's. Exits 1, listing what differs, when
a run ran no test, has another number of tests, another exit status, or any test with
another outcome. PYTEST ARGS go to every run (e.g. ``--poolaware-monitor off``).
Each run's junitxml and output are kept in ``DIR/NAME/results/``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from outcomes import RunOutcomes, compare_runs, read_junit

#: A peer's download and unpacking, kept between runs (tox passes its environment's dir).
DEFAULT_CACHE: Final = Path(sys.prefix) / "peer-sources"
DEFAULT_WORKERS: Final = 4
#: Longest a single run may take before it is killed and counted as broken.
RUN_TIMEOUT: Final = 900.0
#: A line of a run's output naming an exception and its message (``E   pkg.SomeError: ...``),
#: what an INTERNALERROR's long traceback buries; the first few distinct ones are shown.
EXCEPTION_LINE: Final = re.compile(
    r"^(?:INTERNALERROR>)?[\sE]*((?:\w+\.)*\w+(?:Error|Exception|Refused): .*)"
)
MAX_EXCEPTION_LINES: Final = 5
#: The last lines of a run's output, also shown: pytest's summary.
LOG_TAIL_LINES: Final = 3
EXIT_DIFFERENT: Final = 1
EXIT_USAGE: Final = 2
ENV_DSN: Final = "POOLAWARE_DSN"
MASK: Final = "***"


@dataclass(frozen=True)
class Login:
    """The role, database and schemas a peer's suite expects to find on the server."""

    role: str
    password: str
    database: str
    schemas: tuple[str, ...] = ()


@dataclass(frozen=True)
class Peer:
    """A project whose own suite we run: where it comes from, what it needs, which slice."""

    name: str
    #: The sdist on PyPI, pinned (``name==version``); its unpacked folder is the rootdir.
    sdist: str
    #: What the suite needs beside it (drivers), installed from PyPI with it.
    requirements: tuple[str, ...]
    login: Login
    #: Arguments naming the database, with ``{user} {password} {host} {port} {database}``.
    database_args: tuple[str, ...]
    #: The slice: test modules, relative to the unpacked sdist.
    modules: tuple[str, ...]
    pytest_args: tuple[str, ...] = ()
    #: Environment for installing the sdist (e.g. to skip compiling extensions).
    install_env: Mapping[str, str] = field(default_factory=dict)


PEERS: Final = (
    Peer(
        name="sqlalchemy",
        sdist="sqlalchemy==2.0.44",
        requirements=("greenlet>=3", "asyncpg>=0.29"),
        # A superuser: the suite creates a database per worker (from pytest_sessionstart,
        # before the worker has run anything) and extensions in them.
        login=Login("scott", "tiger", "test", ("test_schema", "test_schema_2")),
        database_args=(
            "--dburi",
            "postgresql+asyncpg://{user}:{password}@{host}:{port}/{database}",
        ),
        # The slice: modules that use the database, about 800 tests, chosen so that the
        # three runs take about 4 minutes on two cores (the whole of both folders: ~16,000).
        modules=(
            "test/sql/test_query.py",
            "test/sql/test_returning.py",
            "test/sql/test_update.py",
            "test/sql/test_sequences.py",
            "test/sql/test_defaults.py",
            "test/dialect/postgresql/test_reflection.py",
            "test/dialect/postgresql/test_query.py",
            "test/dialect/postgresql/test_dialect.py",
            "test/dialect/postgresql/test_on_conflict.py",
            "test/dialect/postgresql/test_async_pg.py",
        ),
        pytest_args=(
            "-p",
            "no:randomly",
            # Depends on the server's collations: it can fail under --dist load as well.
            "-k",
            "not test_array_str_collation",
        ),
        # The suite imports the sdist's own lib/, pure Python: no need to compile.
        install_env={"DISABLE_SQLALCHEMY_CEXT": "1"},
    ),
)


@dataclass(frozen=True)
class Mode:
    """One of the three runs: its label, xdist's ``--dist``, and whether its cache starts empty."""

    label: str
    dist: str
    cache: str
    fresh_cache: bool


#: The reference first; the poolaware runs share one cache, cleared before the cold one.
MODES: Final = (
    Mode("load", "load", "cache-load", fresh_cache=True),
    Mode("poolaware-cold", "poolaware", "cache-poolaware", fresh_cache=True),
    Mode("poolaware-warm", "poolaware", "cache-poolaware", fresh_cache=False),
)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options; every other argument goes to pytest, in every run."""
    parser = argparse.ArgumentParser(
        # Never swallow a pytest option that merely starts like ours.
        allow_abbrev=False,
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Other arguments are passed to pytest in every run.",
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="download cache")
    parser.add_argument(
        "--peer", choices=[p.name for p in PEERS], action="append", help="only this peer"
    )
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="pytest -n")
    args, pytest_args = parser.parse_known_args(list(argv))
    if args.workers < 1:
        parser.error(f"argument --workers: expected a positive integer, got {args.workers}")
    return args, [arg for arg in pytest_args if arg != "--"]


# -- the peer's source and installation ------------------------------------------------------


def pinned_version(peer: Peer) -> tuple[str, str]:
    """The sdist's project name and version, from ``name==version``."""
    name, separator, version = peer.sdist.partition("==")
    if not separator or not version:
        raise ValueError(f"{peer.name}: sdist {peer.sdist!r} is not pinned as name==version")
    return name, version


def fetch_sdist(peer: Peer, cache: Path) -> tuple[Path, Path]:
    """The sdist's tarball and its unpacked folder, downloaded from PyPI unless cached.

    Unpacked beside the tarball and renamed into place only when complete, so that an
    interrupted run leaves nothing half unpacked behind for the next one.
    """
    name, version = pinned_version(peer)
    home = cache / peer.name
    source = home / f"{name}-{version}"
    tarballs = sorted(home.glob(f"{name}-{version}.tar.gz"))
    if source.is_dir() and tarballs:
        return tarballs[0], source
    home.mkdir(parents=True, exist_ok=True)
    if not tarballs:
        print(f"peers: downloading {peer.sdist} from PyPI", flush=True)
        # --no-binary for this project only: its build requirements may come as wheels.
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        subprocess.run(
            [*pip, "--no-binary", name, peer.sdist, "--dest", str(home)],
            check=True,
        )
        tarballs = sorted(home.glob(f"{name}-{version}.tar.gz"))
        if not tarballs:
            raise FileNotFoundError(f"pip download left no {name}-{version}.tar.gz in {home}")
    with tempfile.TemporaryDirectory(dir=home) as scratch, tarfile.open(tarballs[0]) as archive:
        archive.extractall(scratch, filter="data")
        shutil.rmtree(source, ignore_errors=True)
        Path(scratch, f"{name}-{version}").rename(source)
    return tarballs[0], source


def installed(requirement: str) -> bool:
    """Whether this interpreter already has a distribution satisfying ``requirement``."""
    from packaging.requirements import Requirement

    wanted = Requirement(requirement)
    try:
        version = importlib.metadata.version(wanted.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return wanted.specifier.contains(version, prereleases=True)


def install(peer: Peer, tarball: Path) -> None:
    """Install the peer's pinned sdist and its suite's requirements here, unless they are."""
    missing = [r for r in (peer.sdist, *peer.requirements) if not installed(r)]
    if not missing:
        return
    print(f"peers: installing {', '.join(missing)}", flush=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", str(tarball)]
    subprocess.run(
        [*command, *peer.requirements], check=True, env={**os.environ, **peer.install_env}
    )


# -- the server ------------------------------------------------------------------------------


def prepare_database(admin_dsn: str, login: Login) -> None:
    """The peer's superuser role, its database and schemas, made where missing."""
    import psycopg
    from psycopg import sql

    role = sql.Identifier(login.role)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (login.role,))
        verb = sql.SQL("ALTER" if exists.fetchone() else "CREATE")
        conn.execute(
            sql.SQL("{} ROLE {} WITH LOGIN SUPERUSER PASSWORD {}").format(
                verb, role, sql.Literal(login.password)
            )
        )
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (login.database,))
        if found.fetchone() is None:
            database = sql.Identifier(login.database)
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(database, role))
    with psycopg.connect(database_dsn(admin_dsn, login.database), autocommit=True) as conn:
        for schema in login.schemas:
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
                    sql.Identifier(schema), role
                )
            )


def database_dsn(dsn: str, database: str) -> str:
    """The same server and login, another database (key=value form)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    return make_conninfo("", **{**conninfo_to_dict(dsn), "dbname": database})


def database_args(peer: Peer, admin_dsn: str) -> list[str]:
    """The peer's database arguments for this server, logging in as the peer's role."""
    from urllib.parse import quote

    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(admin_dsn)
    values = {
        "user": quote(peer.login.role, safe=""),
        "password": quote(peer.login.password, safe=""),
        "host": str(params.get("host") or "localhost"),
        "port": str(params.get("port") or 5432),
        "database": quote(peer.login.database, safe=""),
    }
    return [arg.format(**values) for arg in peer.database_args]


def run_environment(peer: Peer, admin_dsn: str, base: Mapping[str, str]) -> dict[str, str]:
    """The runs' environment: ``POOLAWARE_DSN`` is the peer's login on the server's
    maintenance database (not the peer's, which the suite copies as a template: a session
    on it would make the copy fail), so that the plugin has its own connection."""
    from pytest_poolaware.shared.dsn import with_credentials

    return {**base, ENV_DSN: with_credentials(admin_dsn, peer.login.role, peer.login.password)}


# -- the runs ------------------------------------------------------------------------------


def pytest_command(
    peer: Peer, mode: Mode, workers: int, cache_dir: Path, junit: Path, db_args: Sequence[str]
) -> list[str]:
    """One run of the slice; ``-q`` cancels the peer's own ``-v`` (the log stays short)."""
    return [
        sys.executable,
        "-m",
        "pytest",
        *peer.modules,
        "-n",
        str(workers),
        "--dist",
        mode.dist,
        "-o",
        f"cache_dir={cache_dir}",
        f"--junitxml={junit}",
        "-q",
        *peer.pytest_args,
        *db_args,
    ]


def shown(command: Sequence[str], secret: str) -> str:
    """A command line as printed: the peer's password masked."""
    return shlex.join(command).replace(secret, MASK)


def run_mode(
    peer: Peer, mode: Mode, source: Path, workers: int, extra: Sequence[str]
) -> RunOutcomes:
    """Run the slice once against a fresh server, and read its outcomes back."""
    from poolaware_testserver import postgres_dsn

    results = source.parent / "results"
    results.mkdir(exist_ok=True)
    junit, log_path = results / f"{mode.label}.xml", results / f"{mode.label}.log"
    junit.unlink(missing_ok=True)
    cache_dir = source.parent / mode.cache
    if mode.fresh_cache:
        shutil.rmtree(cache_dir, ignore_errors=True)
    with postgres_dsn() as admin_dsn:
        prepare_database(admin_dsn, peer.login)
        command = pytest_command(
            peer, mode, workers, cache_dir, junit, database_args(peer, admin_dsn)
        ) + list(extra)
        print(f"peers: {peer.name} {mode.label}: {shown(command, peer.login.password)}", flush=True)
        env = run_environment(peer, admin_dsn, os.environ)
        started = time.monotonic()
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                cwd=source,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                status = process.wait(timeout=RUN_TIMEOUT)
                note = ""
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                status = process.wait()
                note = f"killed after {RUN_TIMEOUT:g} s"
            except BaseException:
                # A Ctrl-C reaches only us (the run has a session of its own): its
                # workers must not outlive the server that is about to stop.
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
        wall = time.monotonic() - started
    try:
        outcomes = read_junit(junit)
    except OSError:
        outcomes, note = {}, note or "no junitxml written"
    except ET.ParseError as exc:  # a junitxml cut short by a crash
        outcomes, note = {}, note or f"unreadable junitxml: {exc}"
    run = RunOutcomes(mode.label, status, outcomes, note)
    print(f"peers: {peer.name} {mode.label}: {run.tally()}, exit status {status}, {wall:.0f} s")
    return run


def log_excerpt(path: Path) -> list[str]:
    """From a run's output: the exceptions it names, then its last lines (pytest's summary)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ["(no output)"]
    named = (match.group(1) for line in lines if (match := EXCEPTION_LINE.match(line)))
    return [*list(dict.fromkeys(named))[:MAX_EXCEPTION_LINES], *lines[-LOG_TAIL_LINES:]]


def check_peer(peer: Peer, cache: Path, workers: int, extra: Sequence[str]) -> list[str]:
    """Fetch, install and run one peer; what differs from load's run ([] when nothing)."""
    tarball, source = fetch_sdist(peer, cache)
    install(peer, tarball)
    runs = [run_mode(peer, mode, source, workers, extra) for mode in MODES]
    reference = runs[0]
    found = compare_runs(reference, runs[1:])
    if found:
        for run in runs:
            if run is reference and run.tests:
                continue
            log = source.parent / "results" / f"{run.label}.log"
            found.append(f"{run.label}: its output ({log}) says:")
            found += [f"    | {line}" for line in log_excerpt(log)]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Check every chosen peer; 0 when every poolaware run matches load's."""
    args, pytest_args = parse_args(sys.argv[1:] if argv is None else argv)
    from poolaware_testserver import ServerUnavailable

    chosen = [p for p in PEERS if args.peer is None or p.name in args.peer]
    failures: dict[str, list[str]] = {}
    try:
        for peer in chosen:
            found = check_peer(peer, args.cache.resolve(), args.workers, pytest_args)
            if found:
                failures[peer.name] = found
    except ServerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, subprocess.CalledProcessError, ValueError) as exc:
        print(f"error: could not prepare a peer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for name, found in failures.items():
        print(f"\npeers: FAILED: {name}'s suite does not run alike under load and poolaware:")
        print("\n".join(f"  {line}" for line in found))
    if not failures:
        print(f"\npeers: ok: {', '.join(p.name for p in chosen)} alike under load and poolaware")
    return EXIT_DIFFERENT if failures else 0


if __name__ == "__main__":
    sys.exit(main())
