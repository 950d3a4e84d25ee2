"""Fixtures of the inventory suite, a second suite of the demo's shape.

The shape: ``serial_only`` classes whose tests hold 6-8 connections at once, light
``parallel_safe`` and unmarked tests of 1-2 connections, a few unmarked tests of 5-7, and
one unmarked test of 12 (``test_end_of_day_stock_valuation``). What differs from the
demo is the proportion: here the serial lane (about 8 s) is about a third of the
fan-out's work (about 25 s), so one worker's lane and three workers' fan-out can end
together, and a run that overlaps them can finish in about the lane's time, where the
demo's lane alone (most of its wall) bounds what any schedule can save. It exists to
measure that saving against the two-pass split (``benchmarks/run.py --suite inventory``).

One DSN from ``POOLAWARE_DSN``; a session-scoped sync engine per worker, built by
``pytest_poolaware.engine`` from PG_POOL_SIZE / PG_MAX_OVERFLOW / PG_POOL_TIMEOUT, as
in the demo.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Final

import pytest
from sqlalchemy import Engine
from support import create_schema

from pytest_poolaware.engine import make_engine

ENV_DSN: Final = "POOLAWARE_DSN"


@pytest.fixture(scope="session")
def dsn() -> str:
    """The server under test; the benchmarks set it to a connection-limited role."""
    value = os.environ.get(ENV_DSN, "")
    if not value:
        pytest.fail(
            f"{ENV_DSN} is not set: run it with `python benchmarks/run.py --suite inventory`"
        )
    return value


@pytest.fixture(scope="session")
def db_engine(dsn: str) -> Iterator[Engine]:
    """The session-wide sync engine, like the service's module-level engine."""
    engine = make_engine(dsn)
    create_schema(engine)
    yield engine
    engine.dispose()
