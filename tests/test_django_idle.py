"""Django's own connections, as the meter sees them: idle once Django is done with them,
closed when idle connections are asked back, on the owning thread (or for it, while it
is parked between items), never inside an atomic block.

Run in a subprocess: Django's settings are configured once per process."""

from __future__ import annotations

import pytest
from inner import run
from psycopg.conninfo import conninfo_to_dict
from test_django import DRIVER

CONFTEST = """
import os
import sys

if {driver!r} == "psycopg2":
    # Django's backend takes psycopg 3 when it can import it, else psycopg2.
    sys.modules["psycopg"] = None

import django
from django.conf import settings

settings.configure(
    DATABASES={{"default": {{
        "ENGINE": "django.db.backends.postgresql",
        "NAME": {dbname!r}, "USER": {user!r}, "PASSWORD": {password!r},
        "HOST": {host!r}, "PORT": {port!r},
    }}}},
    USE_TZ=True,
)
django.setup()
"""

TESTS = """
import threading

import pytest
from django.db import connection, transaction

from pytest_poolaware.worker.meter import PoolMeter


@pytest.fixture
def meter():
    meter = PoolMeter(on_change=lambda *counts: None, gate=lambda background: None,
                      on_error=lambda exc: None)
    meter.install()
    yield meter
    connection.close()
    meter.uninstall()


def used(meter):
    meter.begin()
    with connection.cursor() as cursor:
        cursor.execute("select 1")
    return meter.end()


def test_idle_between_tests_and_given_back(meter):
    window = used(meter)
    assert (window.need, window.leaks) == (1, 0)
    assert (meter.open, meter.idle) == (1, 1)
    meter.begin()  # the next test may use it: in use while it runs
    assert meter.idle == 0
    meter.end()
    meter.release_idle()
    assert (meter.open, meter.idle) == (0, 0)
    assert connection.connection is None
    used(meter)  # Django opens it again on next use
    assert meter.open == 1


def test_inside_an_atomic_block_it_stays_in_use(meter):
    used(meter)
    with transaction.atomic():
        meter.begin()
        connection.cursor().execute("select 1")
        meter.end()
        assert meter.idle == 0
        meter.release_idle()
        assert meter.open == 1 and connection.connection is not None


def test_an_open_transaction_keeps_it_in_use(meter):
    used(meter)
    connection.set_autocommit(False)
    try:
        meter.begin()
        connection.cursor().execute("select 1")
        meter.end()
        assert meter.idle == 0
    finally:
        connection.rollback()
        connection.set_autocommit(True)


def test_another_thread_closes_it_only_while_the_owner_is_parked(meter):
    used(meter)
    def release(parked):
        worker = threading.Thread(target=meter.release_idle, kwargs={"parked": parked})
        worker.start()
        worker.join()
    release(parked=False)
    assert meter.open == 1 and connection.connection is not None
    release(parked=True)
    assert meter.open == 0 and connection.connection is None
    used(meter)  # still this thread's: Django reopens it here
    assert meter.open == 1
"""


def test_django_connections_are_idle_once_django_is_done_with_them(
    pytester: pytest.Pytester, postgres_dsn: str
) -> None:
    params = conninfo_to_dict(postgres_dsn)
    pytester.makeconftest(
        CONFTEST.format(
            dbname=str(params.get("dbname", "postgres")),
            user=str(params["user"]),
            password=str(params.get("password", "")),
            host=str(params["host"]),
            port=str(params["port"]),
            driver=DRIVER,
        )
    )
    pytester.makepyfile(test_django_idle=TESTS)
    result = run(pytester, "-p", "no:django", "-p", "no:xdist")
    result.assert_outcomes(passed=4)
