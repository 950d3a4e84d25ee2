from __future__ import annotations

import asyncio

import asyncpg
import pytest
from conftest import DSN, hold_asyncpg, hold_psycopg
from psycopg_pool import ConnectionPool


@pytest.mark.serial_only
@pytest.mark.parametrize("n", range(3))
def test_serial_six_asyncpg(n: int) -> None:
    asyncio.run(hold_asyncpg(6, 0.3))


@pytest.mark.parametrize("n", range(12))
def test_raw_psycopg(n: int) -> None:
    hold_psycopg(3, 0.1)


@pytest.mark.parametrize("n", range(12))
def test_module_pool(pg_pool: ConnectionPool, n: int) -> None:
    conns = [pg_pool.getconn() for _ in range(3)]
    try:
        conns[0].execute("select pg_sleep(0.1)")
    finally:
        for conn in conns:
            pg_pool.putconn(conn)


@pytest.mark.parametrize("n", range(12))
def test_asyncpg_pool_per_test(n: int) -> None:
    async def use() -> None:
        async with asyncpg.create_pool(DSN, min_size=2, max_size=4) as pool:
            conns: list[asyncpg.pool.PoolConnectionProxy] = []
            try:  # a pool closes only once every connection is back
                for _ in range(3):
                    conns.append(await pool.acquire())
                await conns[0].execute("select pg_sleep(0.1)")
            finally:
                for conn in conns:
                    await pool.release(conn)

    asyncio.run(use())


@pytest.mark.parametrize("n", range(12))
def test_bare_asyncpg(n: int) -> None:
    asyncio.run(hold_asyncpg(3, 0.1))
