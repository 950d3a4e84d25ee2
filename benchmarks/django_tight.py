"""A Django project against a role tighter than the workers: ``load`` against poolaware.

    python benchmarks/django_tight.py [--tests N] [--limit L] [--rounds R] [--out DIR]

What a Django team meets on a CI database with a small ``CONNECTION LIMIT``: pytest-django,
one test database per xdist worker, Django's persistent connection per worker, and a role
allowing fewer connections than ``-n 4`` opens. ``--dist load -n 4`` is refused
connections; the team's fallback is ``--dist load -n 2``, which fits. Each round runs,
interleaved: ``load -n 2`` (the reference), ``load -n 4`` (to show the refusals), then
poolaware at ``-n 4`` cold (``--cache-clear``) and warm, the plugin's own connection on the
tests' role (it takes one of the role's slots), and warm again with that connection on
another login (``--poolaware-monitor`` as the server's superuser: the tests keep every slot).
Walls are medians of the rounds, with their ratios to ``load -n 2``; every test's outcome
is compared with it. Writes DIR/django_tight.md and DIR/django_tight.json.
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

DEFAULT_TESTS: Final = 200
DEFAULT_LIMIT: Final = 3
DEFAULT_ROUNDS: Final = 3
#: Each test's time on the server: enough that running tests side by side pays.
TEST_SLEEP: Final = 0.02
#: What a connection refused on the role's limit looks like in a run's output.
REFUSAL: Final = "too many connections for role"

SETTINGS: Final = """
import os

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["DJANGO_DB_NAME"],
        "USER": os.environ["DJANGO_DB_USER"],
        "PASSWORD": os.environ["DJANGO_DB_PASSWORD"],
        "HOST": os.environ["DJANGO_DB_HOST"],
        "PORT": os.environ["DJANGO_DB_PORT"],
    }
}
INSTALLED_APPS = ["shop"]
SECRET_KEY = "benchmark-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
"""

MODELS: Final = """
from django.db import models

class Item(models.Model):
    name = models.CharField(max_length=50)
"""

TESTS: Final = """
import pytest
from django.db import connection
from shop.models import Item

@pytest.mark.django_db
@pytest.mark.parametrize("n", range({tests}))
def test_orm(n):
    Item.objects.create(name=f"item-{{n}}")
    with connection.cursor() as cursor:
        cursor.execute("select pg_sleep(%s)", [{sleep}])
    assert Item.objects.filter(name=f"item-{{n}}").count() == 1
"""

INI: Final = "[pytest]\nDJANGO_SETTINGS_MODULE = settings\npythonpath = .\n"


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    args: tuple[str, ...]
    #: Whether the run follows the previous one on its cache (warm), else clears it.
    warm: bool = False
    #: Whether the plugin's own connection logs in as the server's superuser.
    monitor_elsewhere: bool = False


POOLAWARE: Final = ("-n", "4", "--dist", "poolaware")
MODES: Final = (
    Mode("load -n 2", ("-n", "2", "--dist", "load")),
    Mode("load -n 4", ("-n", "4", "--dist", "load")),
    Mode("poolaware -n 4 cold", POOLAWARE),
    Mode("poolaware -n 4 warm", POOLAWARE, warm=True),
    Mode("poolaware -n 4 warm, monitor elsewhere", POOLAWARE, warm=True, monitor_elsewhere=True),
)
REFERENCE: Final = MODES[0].name


def write_project(root: Path, tests: int) -> None:
    root.mkdir(parents=True)
    (root / "settings.py").write_text(SETTINGS)
    (root / "shop").mkdir()
    (root / "shop" / "__init__.py").write_text("")
    (root / "shop" / "models.py").write_text(MODELS)
    (root / "test_shop.py").write_text(TESTS.format(tests=tests, sleep=TEST_SLEEP))
    (root / "pytest.ini").write_text(INI)


@contextmanager
def tight_role(admin_dsn: str, limit: int) -> Iterator[str]:
    """A role limited to ``limit`` connections that may create the test databases."""
    import psycopg
    from psycopg import sql

    from poolaware_testserver import create_role, drop_role

    role = f"{bench.ROLE_PREFIX}_django_{os.getpid()}"
    dsn = create_role(admin_dsn, role, connection_limit=limit, password="bench")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(sql.Identifier(role)))
    try:
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            names = conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", ("test_shop_%",)
            ).fetchall()
            for (name,) in names:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        drop_role(admin_dsn, role)


def django_env(role_dsn: str) -> dict[str, str]:
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(role_dsn)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG_POOL")}
    return env | {
        "POOLAWARE_DSN": role_dsn,
        "DJANGO_DB_NAME": "shop",
        "DJANGO_DB_USER": str(parts["user"]),
        "DJANGO_DB_PASSWORD": str(parts.get("password", "")),
        "DJANGO_DB_HOST": str(parts["host"]),
        "DJANGO_DB_PORT": str(parts["port"]),
    }


def run_rounds(
    project: Path, work: Path, env: dict[str, str], admin_dsn: str, rounds: int
) -> dict[str, Any]:
    """Every mode once a round; refusals counted in each run's output."""

    def run_of(mode: Mode, round_: int) -> Run:
        cache = work / "cache"
        args = [str(project), "-o", f"cache_dir={cache}", "--rootdir", str(project)]
        args += [*KEEP_ORDER, *mode.args]
        if mode.monitor_elsewhere:
            args += ["--poolaware-monitor", admin_dsn]
        if not mode.warm:
            args.append("--cache-clear")
        return Run(f"django-{mode.name.replace(' ', '_').replace(',', '')}-{round_}", args)

    return run_interleaved(
        MODES,
        REFERENCE,
        rounds,
        run_of,
        env,
        work,
        progress="django",
        reference_key="reference",
        outcomes_summed=True,
        log_counts={"refusals_in_output": REFUSAL},
    )


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Django project: {report['tests']} tests (pytest-django, one test database per "
        f"worker, persistent connections), a role with CONNECTION LIMIT {report['limit']}; "
        f"{report['rounds']} interleaved rounds (load average at start "
        f"{report['loadavg_at_start']}, at end {report['loadavg_at_end']}).",
        "",
        f"| mode | wall s (median) | rounds | outcomes | refusals | differences | / {REFERENCE} |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for name, mode in report["modes"].items():
        median = f"{mode['median']:.1f}" if mode["median"] else "-"
        ratio = f"{mode['ratio_over_reference']:.2f}" if mode["ratio_over_reference"] else "-"
        tally = ", ".join(f"{k} {v}" for k, v in sorted(mode["outcomes"].items()))
        lines.append(
            f"| {name} | {median} | {mode['walls']} | {tally} | {mode['refusals_in_output']} "
            f"| {len(mode['differences_from_reference'])} | {ratio} |"
        )
    for name, tail in report["failures"].items():
        lines.append(f"- {name} did not run:\n\n```\n{tail}\n```")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=DEFAULT_TESTS)
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--out", type=Path, default=bench.DEFAULT_OUT)
    parser.add_argument(
        "--work", type=Path, help="keep the project and every run's output here (a new directory)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if min(args.tests, args.limit, args.rounds) < 1:
        parser.error("--tests, --limit and --rounds must be positive")
    from poolaware_testserver import ServerUnavailable, postgres_dsn

    report: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tests": args.tests,
        "limit": args.limit,
        "rounds": args.rounds,
        "loadavg_at_start": bench.loadavg(),
    }
    with ExitStack() as kept:
        work = args.work or Path(kept.enter_context(tempfile.TemporaryDirectory(prefix="django-")))
        project = work / "project"
        write_project(project, args.tests)
        with ExitStack() as server:
            try:
                admin_dsn = server.enter_context(postgres_dsn())
            except ServerUnavailable as exc:
                print(f"error: {exc}", file=sys.stderr)
                return bench.EXIT_NO_SERVER
            with tight_role(admin_dsn, args.limit) as role_dsn:
                env = django_env(role_dsn)
                report |= run_rounds(project, work, env, admin_dsn, args.rounds)
    report["loadavg_at_end"] = bench.loadavg()
    markdown = render(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "django_tight.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "django_tight.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
