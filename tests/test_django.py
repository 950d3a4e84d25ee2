"""End to end: a Django project tested with pytest-django under ``-n 4``, per-worker test
databases, Django opening one psycopg connection per thread and keeping it."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest
from inner import ROLE_LIMIT, connection_errors, run, serve_limited_role
from psycopg import sql
from test_scheduling import ServerSampler

#: Django 5.2's PostgreSQL backend refuses older psycopg 3 releases (the matrix's oldest
#: end installs psycopg 3.1.0, below it; the newest end runs these tests).
DJANGO_MIN_PSYCOPG = (3, 1, 8)
_psycopg = tuple(int(part) for part in psycopg.__version__.split(".")[:3] if part.isdigit())
pytestmark = pytest.mark.skipif(
    _psycopg < DJANGO_MIN_PSYCOPG,
    reason=f"Django needs psycopg >= 3.1.8; this environment has {psycopg.__version__}",
)

SETTINGS = """
import os
from psycopg.conninfo import conninfo_to_dict

_dsn = conninfo_to_dict(os.environ["POOLAWARE_DSN"])
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["DJANGO_DB_NAME"],
        "USER": _dsn["user"],
        "PASSWORD": _dsn.get("password", ""),
        "HOST": _dsn["host"],
        "PORT": _dsn["port"],
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


@pytest.fixture
def django_project(
    pytester: pytest.Pytester,
    limited_role: Any,
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:
    _, role = serve_limited_role(limited_role, ROLE_LIMIT, monkeypatch)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(sql.Identifier(role)))
    monkeypatch.setenv("DJANGO_DB_NAME", f"shop_{uuid.uuid4().hex[:8]}")
    pytester.makefile(".py", settings=SETTINGS)
    pytester.mkpydir("shop")
    (pytester.path / "shop" / "models.py").write_text(MODELS)
    pytester.makepyfile(test_shop=TESTS)
    pytester.makeini("[pytest]\nDJANGO_SETTINGS_MODULE = settings\npythonpath = .\n")
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
    assert {d for t in data["tests"] for d in t["drivers"]} == {"psycopg"}
