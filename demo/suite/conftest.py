"""Fixtures shaped like the teams' integration conftest.

One DSN from ``POOLAWARE_DSN``; a session-scoped sync engine and a module-scoped async
engine, both built by ``pytest_poolaware.engine`` from PG_POOL_SIZE / PG_MAX_OVERFLOW /
PG_POOL_TIMEOUT. Each xdist worker is its own process, so each has its own pools, and
pools keep up to PG_POOL_SIZE idle connections between tests: that is what multiplies
connections under ``-n 4``.

Async tests are plain sync functions that drive coroutines on a module-scoped event loop
(no pytest-asyncio). The loop lives as long as the async engine because asyncpg
connections belong to the loop that opened them; a fresh ``asyncio.run`` per test could
not reuse the pooled connections.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Final

import pytest
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from support import RunAsync, create_schema

from pytest_poolaware.engine import make_async_engine, make_engine

ENV_DSN: Final = "POOLAWARE_DSN"


@pytest.fixture(scope="session")
def dsn() -> str:
    """The server under test; the demo runner sets it to a connection-limited role."""
    value = os.environ.get(ENV_DSN, "")
    if not value:
        pytest.fail(f"{ENV_DSN} is not set: run the demo with `python demo/run.py`")
    return value


@pytest.fixture(scope="session")
def db_engine(dsn: str) -> Iterator[Engine]:
    """The session-wide sync engine, like ``db.py``'s module-level engine in a real app."""
    engine = make_engine(dsn)
    create_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def run_async() -> Iterator[RunAsync]:
    """Run a coroutine to completion on this module's event loop."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


@pytest.fixture(scope="module")
def async_engine(dsn: str, db_engine: Engine, run_async: RunAsync) -> Iterator[AsyncEngine]:
    """A module-scoped async engine (the ``async_db_session`` side of the suite)."""
    engine = make_async_engine(dsn)
    yield engine
    run_async(engine.dispose())
