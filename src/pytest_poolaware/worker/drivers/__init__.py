"""Driver-level hooks: every PostgreSQL connection psycopg 3, psycopg2, asyncpg and pg8000
open, counted where the driver makes it.

Pools and frameworks (SQLAlchemy, psycopg_pool, asyncpg.Pool, Django) all end in a few
places inside the drivers that are looked up when a connection is made: a classmethod on
the connection class, a module function looked up on its module. Wrapping those counts
every connection however it was opened, including through names a user imported before
the plugin loaded (``from psycopg import connect``). The wrappers hand what they see to a
``ConnectionSink`` (the worker's meter); they never decide anything themselves.

One module per driver, each described by one ``Driver`` record (``base``) and listed in
``registry``; the rest of the worker asks the record. The parts every driver shares are
modules of their own: replacing names (``patching``), noticing imports (``importhook``),
seeing backends exit (``watch``: a close is reported only once the server has let the
backend go, since until then it still counts it against the login's limit) and
installing it all (``hooks``). ``docs/drivers.md`` says why each hook sits where it does.
"""

from __future__ import annotations

from pytest_poolaware.worker.drivers.base import (
    ConnectionSink,
    Driver,
    HookedInternal,
    running_loop,
)
from pytest_poolaware.worker.drivers.hooks import DriverHooks
from pytest_poolaware.worker.drivers.registry import (
    DRIVERS,
    HOOKED_INTERNALS,
    for_sqlalchemy,
    named,
)
from pytest_poolaware.worker.drivers.watch import BACKEND_EXIT_TIMEOUT, BackendExits

__all__ = [
    "BACKEND_EXIT_TIMEOUT",
    "DRIVERS",
    "HOOKED_INTERNALS",
    "BackendExits",
    "ConnectionSink",
    "Driver",
    "DriverHooks",
    "HookedInternal",
    "for_sqlalchemy",
    "named",
    "running_loop",
]
