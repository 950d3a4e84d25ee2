"""Run the demo suite the way the affected teams' CI would, against a connection-limited role.

    python demo/run.py [--workers N] [--role-limit N] [extra pytest args]

Starts a throwaway PostgreSQL unless POOLAWARE_DSN names one (a superuser DSN: we create a
role there), creates a role allowed ROLE_LIMIT connections, and runs
``pytest demo/suite -n WORKERS --dist poolaware`` with POOLAWARE_DSN set to that role and
PG_POOL_SIZE / PG_MAX_OVERFLOW defaulting to 5 / 10 (budget 15 under a limit of 16).
Extra arguments go to pytest after ours, so ``--dist load`` or ``-n 0`` override them.
Exits with pytest's exit code.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

SUITE: Final = Path(__file__).resolve().parent / "suite"
DEFAULT_WORKERS: Final = 4
#: The role's CONNECTION LIMIT: one more than the default budget (5 + 10).
DEFAULT_ROLE_LIMIT: Final = 16
#: Pool sizing for every engine in the suite, unless the caller's environment sets it.
POOL_DEFAULTS: Final = {"PG_POOL_SIZE": "5", "PG_MAX_OVERFLOW": "10"}
ENV_DSN: Final = "POOLAWARE_DSN"
ROLE_PREFIX: Final = "poolaware_demo"
#: Where the demo leaves its connection timeline (SVG), trace (Chrome trace event JSON, for
#: Perfetto or chrome://tracing) and run report (JSON).
OUTPUT: Final = Path(__file__).resolve().parent / "out"
#: Drivers the suite's engines need (not dependencies of the plugin itself), and the
#: project's throwaway-server support package, each with where it comes from.
NEEDED: Final = {
    "psycopg": ".[test]",
    "asyncpg": ".[test]",
    "greenlet": ".[test]",
    "poolaware_testserver": "./support",
}
EXIT_USAGE: Final = 2


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags; everything we do not know is passed to pytest unchanged."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # never swallow a pytest option that merely starts like ours
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Other arguments are passed to pytest.",
    )
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="pytest -n")
    parser.add_argument(
        "--role-limit", type=int, default=DEFAULT_ROLE_LIMIT, help="the role's CONNECTION LIMIT"
    )
    return parser.parse_known_args(list(argv))


def pytest_command(workers: int, extra: Sequence[str], monitor_dsn: str) -> list[str]:
    """The pytest invocation: our defaults first so that ``extra`` can override them.

    The server is watched through the superuser's DSN: a monitor connection of the
    limited role would take one of the role's few slots.
    """
    return [
        sys.executable,
        "-m",
        "pytest",
        str(SUITE),
        "-n",
        str(workers),
        "--dist",
        "poolaware",
        "--poolaware-monitor",
        monitor_dsn,
        f"--poolaware-timeline={OUTPUT / 'timeline.svg'}",
        f"--poolaware-trace={OUTPUT / 'trace.json'}",
        f"--poolaware-report={OUTPUT / 'report.json'}",
        *extra,
    ]


def suite_environment(role_dsn: str, base: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: the role's DSN, and pool sizes unless already set."""
    env = {**POOL_DEFAULTS, **base}
    env[ENV_DSN] = role_dsn
    return env


def missing_packages() -> list[str]:
    """Packages the demo needs that are not installed."""
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    """Set up the server and role, run pytest, return its exit code."""
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    missing = missing_packages()
    if missing:
        sources = " ".join(sorted({f"'{NEEDED[name]}'" for name in missing}))
        print(f"error: the demo needs {', '.join(missing)}: pip install {sources}", file=sys.stderr)
        return EXIT_USAGE
    from poolaware_testserver import ServerUnavailable, create_role, drop_role, postgres_dsn

    role = f"{ROLE_PREFIX}_{os.getpid()}"
    try:
        with postgres_dsn() as admin_dsn:
            role_dsn = create_role(admin_dsn, role, connection_limit=args.role_limit)
            try:
                env = suite_environment(role_dsn, os.environ)
                command = pytest_command(args.workers, extra, admin_dsn)
                return subprocess.run(command, env=env).returncode
            finally:
                drop_role(admin_dsn, role)
    except ServerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
