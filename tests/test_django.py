"""End to end: a Django project tested with pytest-django under ``-n 4``, per-worker test
databases, Django opening one psycopg (or psycopg2) connection per thread."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import psycopg
import pytest
from inner import POOL_ENV, ROLE_LIMIT, connection_errors, run, serve_limited_role
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from test_report import section
from test_scheduling import ServerSampler

#: Django 5.2's PostgreSQL backend refuses psycopg 3 releases older than this one. With
#: an older psycopg (the matrix's oldest end installs 3.1.0), the project runs on
#: psycopg2, as a Django project without psycopg 3 does.
DJANGO_MIN_PSYCOPG = (3, 1, 8)
_psycopg = tuple(int(part) for part in psycopg.__version__.split(".")[:3] if part.isdigit())
DRIVER = "psycopg" if _psycopg >= DJANGO_MIN_PSYCOPG else "psycopg2"
#: Where Django runs on psycopg2, its settings bar psycopg in every process, the
#: controller's included (pytest-django loads them there too): the plugin's own
#: connection, which reads the server's room, needs psycopg, so it has none.
needs_the_plugins_connection = pytest.mark.skipif(
    DRIVER != "psycopg",
    reason="psycopg is too old for Django here: the project bars it, and with it the "
    "plugin's own connection",
)

SETTINGS = """
import os
import sys

if os.environ["DJANGO_DRIVER"] == "psycopg2":
    # Django's backend takes psycopg 3 when it can import it, else psycopg2.
    sys.modules["psycopg"] = None

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
SECRET_KEY = "tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
"""

MODELS = """
from django.db import models

class Item(models.Model):
    name = models.CharField(max_length=50)
"""

TESTS = """
import threading
import pytest
from django.db import connection
from shop.models import Item

pytestmark = pytest.mark.django_db(transaction=True)
THREADS = 6

@pytest.mark.parametrize("n", range(8))
def test_orm(n):
    Item.objects.create(name=f"item-{n}")
    assert Item.objects.filter(name=f"item-{n}").count() == 1

@pytest.mark.parametrize("n", range(8))
def test_one_connection_per_thread(n):
    # Django opens a connection per thread: THREADS at once, beside the test's own.
    errors = []
    barrier = threading.Barrier(THREADS, timeout=60)

    def work():
        try:
            Item.objects.count()
            barrier.wait()
            Item.objects.raw("select 1 as id, pg_sleep(0.3)")[0]
        except Exception as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            connection.close()

    Item.objects.count()
    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real:
        raise real[0]
    assert not errors
"""


def make_project(
    pytester: pytest.Pytester,
    role_dsn: str,
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    **tests: str,
) -> str:
    """The Django project, its tests connecting as the role of ``role_dsn`` (which may
    create the per-worker test databases): the role's name."""
    dsn = conninfo_to_dict(role_dsn)
    role = str(dsn["user"])
    monkeypatch.setenv("DJANGO_DRIVER", DRIVER)
    monkeypatch.setenv("DJANGO_DB_USER", role)
    monkeypatch.setenv("DJANGO_DB_PASSWORD", str(dsn.get("password", "")))
    monkeypatch.setenv("DJANGO_DB_HOST", str(dsn["host"]))
    monkeypatch.setenv("DJANGO_DB_PORT", str(dsn["port"]))
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(sql.Identifier(role)))
    monkeypatch.setenv("DJANGO_DB_NAME", f"shop_{uuid.uuid4().hex[:8]}")
    pytester.makefile(".py", settings=SETTINGS)
    pytester.mkpydir("shop")
    (pytester.path / "shop" / "models.py").write_text(MODELS)
    pytester.makepyfile(**tests)
    pytester.makeini("[pytest]\nDJANGO_SETTINGS_MODULE = settings\npythonpath = .\n")
    return role


@pytest.fixture
def django_project(
    pytester: pytest.Pytester,
    limited_role: Any,
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:
    role_dsn, role = serve_limited_role(limited_role, ROLE_LIMIT, monkeypatch)
    make_project(pytester, role_dsn, postgres_dsn, monkeypatch, test_shop=TESTS)
    return {"role": role}


def test_django_load_exhausts_connections_where_poolaware_does_not(
    pytester: pytest.Pytester, django_project: dict[str, Any], postgres_dsn: str
) -> None:
    load = run(pytester, "-n", "4", "--dist", "load")
    assert connection_errors(load) > 0

    report = pytester.path / "report.json"
    with ServerSampler(postgres_dsn, django_project["role"]) as sampler:
        result = run(pytester, "-n", "4", "--dist", "poolaware", f"--poolaware-report={report}")
    result.assert_outcomes(passed=16)
    assert connection_errors(result) == 0
    assert 0 < sampler.peak <= 15
    data = json.loads(report.read_text())
    needs = {t["nodeid"].split("[")[0]: t["need"] for t in data["tests"]}
    assert needs["test_shop.py::test_one_connection_per_thread"] == 7  # counted per thread
    assert {d for t in data["tests"] for d in t["drivers"]} == {DRIVER}


#: A small project's suite as Django projects write them: test cases whose every test
#: runs in a transaction on the worker's one connection, which Django keeps open between
#: tests; and a few tests that touch no database.
CASES = (
    "from django.test import TestCase\nfrom shop.models import Item\n\n\n"
    "class ItemTests(TestCase):\n"
    + "".join(
        f"    def test_it_{n}(self):\n"
        f"        Item.objects.create(name='item-{n}')\n"
        f"        self.assertEqual(Item.objects.filter(name='item-{n}').count(), 1)\n\n"
        for n in range(10)
    )
)
PLAIN = "".join(f"def test_plain_{n}():\n    assert {n} + 1\n\n" for n in range(3))
#: The role's limit: with the plugin's own connection, a budget of 4 for four workers that
#: each keep a connection open (and open a second one at times).
SMALL_ROLE_LIMIT = 5
#: The summary's length that a new user can read at a glance, whatever happened.
SUMMARY_LINES = 16


@needs_the_plugins_connection
def test_django_summary_is_short_true_and_its_counts_add_up(
    pytester: pytest.Pytester,
    limited_role: Any,
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four workers each keep a connection open, against a budget of 4 learned from the
    role's limit: the summary stays short, advises nothing for tests that held one
    connection, counts none of the run's connections as other clients', and names the
    per-worker test databases in one note, as the same role's room."""
    role_dsn = limited_role(SMALL_ROLE_LIMIT)
    # Nothing configured: the server is learned from the tests' connections, as users do.
    for name in ("POOLAWARE_DSN", *POOL_ENV):
        monkeypatch.delenv(name, raising=False)
    make_project(
        pytester,
        role_dsn,
        postgres_dsn,
        monkeypatch,
        test_a=CASES,
        test_b=CASES,
        test_c=CASES,
        test_plain=PLAIN,
    )
    report = pytester.path / "report.json"
    result = run(pytester, "-n", "4", "--dist", "poolaware", f"--poolaware-report={report}")
    result.assert_outcomes(passed=33)
    lines = section(result)
    text = "\n".join(lines)
    assert len(lines) <= SUMMARY_LINES, text
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) <= 3, text
    assert "needed 1 connections" not in text
    data = json.loads(report.read_text())
    for overrun in data["run"]["overruns"]:
        if overrun["need"] <= overrun["budget"]:
            assert overrun["cause"] in ("kept_open", "crowded"), overrun
    assert "serial_only candidate" not in text
    assert not [a for a in data["advice"] if a["need"] < 2]
    # The run alone uses the role: nothing of it is another client's.
    budget = lines[0]
    assert re.match(r"budget: \d+ connections \(role ", budget), text
    assert "held by other clients" not in text, text
    assert "the tightest of" not in budget, text  # one role: one room
    assert not [n for n in lines if n.startswith("note: tests also connected as ")], text
    databases = [n for n in lines if "other databases as" in n]
    assert len(databases) == 1, text  # the four per-worker test databases, in one line


@needs_the_plugins_connection
def test_per_worker_test_databases_are_read_as_one_login(
    pytester: pytest.Pytester, django_project: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No DSN given: the plugin learns the server from the workers' connections, and
    pytest-django's ``test_<name>_gw0``... databases (one per worker, the same role) are
    one login: no note each, and the budget stays the role's room."""
    monkeypatch.delenv("POOLAWARE_DSN")
    result = run(pytester, "-n", "4", "--dist", "poolaware")
    result.assert_outcomes(passed=16)
    assert connection_errors(result) == 0
    output = result.stdout.str()
    assert "tests also connected as" not in output
    budget = next(line for line in result.stdout.lines if line.startswith("budget:"))
    assert "binds, the tightest of" not in budget  # the role's room, read once
    assert "held by other clients" not in budget
    lines = [line for line in result.stdout.lines if "other databases as" in line]
    assert len(lines) == 1, output
    assert "none has a connection limit of its own" in lines[0]


#: A role as tight as a CI database's: fewer slots than workers.
TIGHT_LIMIT = 3
TIGHT_TESTS = 40
#: Plain pytest-django tests: each in its own transaction, on the worker's persistent
#: connection (Django keeps it open across tests).
PERSISTENT = f"""
import pytest
from shop.models import Item

@pytest.mark.django_db
@pytest.mark.parametrize("n", range({TIGHT_TESTS}))
def test_orm(n):
    Item.objects.create(name=f"item-{{n}}")
    assert Item.objects.filter(name=f"item-{{n}}").count() == 1
"""


@needs_the_plugins_connection
def test_django_under_a_role_tighter_than_the_workers_passes_where_load_fails(
    pytester: pytest.Pytester, limited_role: Any, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four workers, each with Django's persistent connection and its own test database,
    against a role allowing three connections: ``load`` is refused connections; poolaware
    gives a waiting worker the room of another's idle Django connection, and says that
    fewer workers than started hold connections at once."""
    role_dsn, role = serve_limited_role(limited_role, TIGHT_LIMIT, monkeypatch)
    make_project(pytester, role_dsn, postgres_dsn, monkeypatch, test_shop=PERSISTENT)
    project = {"role": role}
    load = run(pytester, "-n", "4", "--dist", "load")
    assert connection_errors(load) > 0

    report = pytester.path / "report.json"
    with ServerSampler(postgres_dsn, project["role"]) as sampler:
        result = run(pytester, "-n", "4", "--dist", "poolaware", f"--poolaware-report={report}")
    result.assert_outcomes(passed=TIGHT_TESTS)
    assert connection_errors(result) == 0
    assert "rerun alone" not in result.stdout.str()
    # The plugin's own connection takes one slot; the tests have the other two, and
    # use both (sharing, on by default, keeps no slot free for another run here: it
    # would leave the tests one).
    assert sampler.peak <= TIGHT_LIMIT
    assert json.loads(report.read_text())["run"]["peak_open_workers"] == TIGHT_LIMIT - 1
    role = project["role"]
    result.stdout.fnmatch_lines(
        [
            f"budget: 2 connections (role {role} CONNECTION LIMIT {TIGHT_LIMIT}, "
            "1 kept for the monitor; configured 15)",
            "note: the budget (2) is smaller than the 4 workers: at most 2 of them held "
            "connections at once, the others waiting for one to give its idle connections "
            "back",
        ]
    )
    data = json.loads(report.read_text())
    assert {d for t in data["tests"] for d in t["drivers"]} == {DRIVER}


@needs_the_plugins_connection
def test_with_the_plugins_connection_on_another_login_the_tests_keep_every_slot(
    pytester: pytest.Pytester, limited_role: Any, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same tight role, the plugin's own connection given as the server's superuser
    (``--poolaware-monitor``) beside ``$POOLAWARE_DSN``, the tests' login: the tests'
    role's room is read before any worker starts and binds, and the monitor takes none
    of its slots."""
    role_dsn, role = serve_limited_role(limited_role, TIGHT_LIMIT, monkeypatch)
    make_project(pytester, role_dsn, postgres_dsn, monkeypatch, test_shop=PERSISTENT)
    with ServerSampler(postgres_dsn, role) as sampler:
        result = run(
            pytester, "-n", "4", "--dist", "poolaware", "--poolaware-monitor", postgres_dsn
        )
    result.assert_outcomes(passed=TIGHT_TESTS)
    assert connection_errors(result) == 0
    assert sampler.peak <= TIGHT_LIMIT
    result.stdout.fnmatch_lines(
        [
            f"budget: {TIGHT_LIMIT} connections (role {role} CONNECTION LIMIT {TIGHT_LIMIT}; "
            f"*; {role}@* binds, the tightest of 2 logins)",
        ]
    )
