"""The worker-side meter against a real server: counts, and errors kept from the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from pytest_poolaware.engine import make_async_engine, make_engine
from pytest_poolaware.worker.meter import PoolMeter


class Seen:
    """What a meter reported: counts in order, and errors handed over."""

    def __init__(self) -> None:
        self.counts: list[tuple[int, int]] = []
        self.errors: list[BaseException] = []
        self.gates = 0


@pytest.fixture
def seen() -> Iterator[tuple[PoolMeter, Seen]]:
    record = Seen()

    def gate(background: bool) -> None:
        record.gates += 1

    meter = PoolMeter(
        on_change=lambda open_, idle, released, version: record.counts.append((open_, idle)),
        gate=gate,
        on_error=record.errors.append,
    )
    meter.install()
    yield meter, record
    meter.uninstall()


def test_sync_pool_counted_gated_and_released(
    seen: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, record = seen
    engine = make_engine(postgres_dsn)
    meter.begin()
    with engine.connect() as a, engine.connect() as b:
        a.execute(text("select 1"))
        b.execute(text("select 1"))
    window = meter.end()
    assert (window.need, window.peak_open, record.gates) == (2, 2, 2)
    assert (meter.open, meter.idle) == (2, 2)  # back in the pool, still open on the server
    meter.release_idle()
    assert (meter.open, meter.idle) == (0, 0)
    assert record.counts[-1] == (0, 0)
    engine.dispose()


def test_asyncpg_pool_counted_and_released_on_its_loop(
    seen: tuple[PoolMeter, Seen], postgres_dsn: str
) -> None:
    meter, _ = seen
    loop = asyncio.new_event_loop()
    try:
        engine = make_async_engine(postgres_dsn)

        async def use() -> None:
            async with engine.connect() as a, engine.connect() as b:
                await a.execute(text("select 1"))
                await b.execute(text("select 1"))

        meter.begin()
        loop.run_until_complete(use())
        assert (meter.end().need, meter.open, meter.idle) == (2, 2, 2)
        meter.release_idle()  # the loop is idle: disposed on it
        assert meter.open == 0
        loop.run_until_complete(engine.dispose())
    finally:
        loop.close()


def test_a_failing_listener_never_fails_the_test(postgres_dsn: str) -> None:
    errors: list[BaseException] = []

    def broken(open_: int, idle: int, released: bool, version: int) -> None:
        raise RuntimeError("channel gone")

    meter = PoolMeter(on_change=broken, gate=lambda background: None, on_error=errors.append)
    meter.install()
    try:
        engine = make_engine(postgres_dsn)
        for _ in range(3):
            with engine.connect() as conn:
                assert conn.execute(text("select 1")).scalar() == 1
            engine.dispose()
    finally:
        meter.uninstall()
    assert [str(e) for e in errors] == ["channel gone"]  # contained, reported once
