"""A suite that never touches SQLAlchemy: raw psycopg, a module-scoped psycopg_pool,
per-test asyncpg pools, bare asyncpg connects, and serial tests holding six asyncpg
connections at once. The benchmarks' raw-driver suite, and the end-to-end tests'."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import asyncpg
import pytest
from psycopg import connect  # imported by name before the plugin hooks the drivers
from psycopg_pool import ConnectionPool

DSN = os.environ["POOLAWARE_DSN"]
POOL_TIMEOUT = 15


def hold_psycopg(n: int, seconds: float) -> None:
    conns = [connect(DSN) for _ in range(n)]
    try:
        conns[0].execute("select pg_sleep(%s)", [seconds])
    finally:
        for conn in conns:
            conn.close()


async def hold_asyncpg(n: int, seconds: float, gather: bool = False) -> None:
    if gather:
        conns = await asyncio.gather(*(asyncpg.connect(DSN) for _ in range(n)))
    else:
        conns = [await asyncpg.connect(DSN) for _ in range(n)]
    try:
        await conns[0].execute(f"select pg_sleep({seconds})")
    finally:
        for conn in conns:
            await conn.close()


@pytest.fixture(scope="module")
def pg_pool() -> Iterator[ConnectionPool]:
    # A pool that cannot connect makes each test wait this long before it fails.
    with ConnectionPool(DSN, min_size=2, max_size=4, timeout=POOL_TIMEOUT) as pool:
        yield pool
