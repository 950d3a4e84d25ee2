"""The drivers the worker counts connections of: one line each.

A driver joins by adding its module's ``Driver`` here (``docs/adding-a-driver.md``).
"""

from __future__ import annotations

from typing import Final

from pytest_poolaware.worker.drivers.asyncpg import ASYNCPG
from pytest_poolaware.worker.drivers.base import Driver, HookedInternal
from pytest_poolaware.worker.drivers.pg8000 import PG8000
from pytest_poolaware.worker.drivers.psycopg import PSYCOPG
from pytest_poolaware.worker.drivers.psycopg2 import PSYCOPG2

DRIVERS: Final[tuple[Driver, ...]] = (
    PSYCOPG,
    PSYCOPG2,
    ASYNCPG,
    PG8000,
)

#: Every private internal the hooks wrap or read, in one place; the versions each was
#: checked against are ``compat.DRIVERS_TESTED[internal.package]``.
HOOKED_INTERNALS: Final[tuple[HookedInternal, ...]] = tuple(
    internal for driver in DRIVERS for internal in driver.internals
)


def named(name: str, drivers: tuple[Driver, ...] = DRIVERS) -> Driver | None:
    """The driver a connection was counted under (``ConnectionSink.opened``'s name)."""
    return next((driver for driver in drivers if driver.name == name), None)


def for_sqlalchemy(dialect_driver: str, drivers: tuple[Driver, ...] = DRIVERS) -> Driver | None:
    """The driver behind a SQLAlchemy dialect driver name (``dialect.driver``)."""
    return next((driver for driver in drivers if dialect_driver in driver.sqlalchemy), None)
