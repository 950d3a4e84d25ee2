"""The engine helper: pool sizing from the environment, drivers, application_name."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import NullPool, QueuePool

from pytest_poolaware import engine as helper
from pytest_poolaware.shared.settings import ConfigError, PoolSettings

URL = "postgresql://user@db.invalid/app"  # engines connect lazily: no server needed
WHO_AM_I = "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"

Factory = Callable[..., Any]
FACTORIES = [
    pytest.param(helper.make_engine, id="sync"),
    pytest.param(helper.make_async_engine, id="async"),
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No pool sizing or worker name leaks in from the shell or from xdist."""
    for name in ("PG_POOL_SIZE", "PG_MAX_OVERFLOW", "PG_POOL_TIMEOUT", "PYTEST_XDIST_WORKER"):
        monkeypatch.delenv(name, raising=False)


def queue_pool(engine: Any) -> QueuePool:
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    return pool


def test_pool_follows_environment(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_POOL_SIZE", "1")
    monkeypatch.setenv("PG_MAX_OVERFLOW", "1")
    monkeypatch.setenv("PG_POOL_TIMEOUT", "0.2")
    engine = helper.make_engine(postgres_dsn)
    try:
        pool = queue_pool(engine)
        assert (pool.size(), pool.timeout()) == (1, 0.2)
        # pool_size + max_overflow connections are held: the next one waits, then gives up.
        with engine.connect(), engine.connect(), pytest.raises(PoolTimeout):
            engine.connect()
    finally:
        engine.dispose()


@pytest.mark.parametrize("factory", FACTORIES)
def test_defaults_and_caller_kwargs(factory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    assert queue_pool(factory(URL)).size() == PoolSettings().pool_size
    monkeypatch.setenv("PG_POOL_SIZE", "3")
    assert queue_pool(factory(URL)).size() == 3
    pool = queue_pool(factory(URL, pool_size=4, pool_timeout=9))
    assert (pool.size(), pool.timeout()) == (4, 9)


@pytest.mark.parametrize("factory", FACTORIES)
def test_explicit_settings_skip_environment(
    factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PG_POOL_SIZE", "ten")
    settings = PoolSettings(pool_size=2, max_overflow=0, pool_timeout=1.5)
    pool = queue_pool(factory(URL, settings=settings))
    assert (pool.size(), pool.timeout()) == (2, 1.5)


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize(
    ("name", "value"),
    [("PG_POOL_SIZE", "ten"), ("PG_MAX_OVERFLOW", "-1"), ("PG_POOL_TIMEOUT", "0")],
)
def test_bad_environment_names_variable_and_value(
    factory: Factory, name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name}='{value}'"):
        factory(URL)


def test_pools_that_take_no_size_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(helper.make_engine(URL, poolclass=NullPool).pool, NullPool)


@pytest.mark.parametrize(
    ("factory", "url", "drivername"),
    [
        (helper.make_engine, URL, "postgresql+psycopg"),
        (helper.make_engine, "postgres://user@db.invalid/app", "postgresql+psycopg"),
        (helper.make_engine, sqlalchemy.make_url(URL), "postgresql+psycopg"),
        (helper.make_async_engine, URL, "postgresql+asyncpg"),
        (helper.make_async_engine, "postgresql+psycopg://u@db.invalid/a", "postgresql+psycopg"),
    ],
)
def test_driver_is_added_when_missing(factory: Factory, url: Any, drivername: str) -> None:
    assert factory(url).url.drivername == drivername


def test_other_databases_are_refused() -> None:
    with pytest.raises(ValueError, match="PostgreSQL"):
        helper.make_engine("sqlite:///:memory:")


@pytest.mark.parametrize(
    ("worker", "expected"), [("gw3", "poolaware-gw3"), (None, "poolaware-main")]
)
def test_sync_application_name(
    postgres_dsn: str, worker: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if worker is not None:
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    engine = helper.make_engine(postgres_dsn, connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            assert conn.scalar(sqlalchemy.text(WHO_AM_I)) == expected
    finally:
        engine.dispose()


def test_sync_caller_application_name_wins(postgres_dsn: str) -> None:
    engine = helper.make_engine(postgres_dsn, connect_args={"application_name": "mine"})
    try:
        with engine.connect() as conn:
            assert conn.scalar(sqlalchemy.text(WHO_AM_I)) == "mine"
    finally:
        engine.dispose()


async def async_names(dsn: str, **kwargs: Any) -> tuple[str, str]:
    """application_name and search_path as an async engine's connection sees them."""
    engine = helper.make_async_engine(dsn, **kwargs)
    try:
        async with engine.connect() as conn:
            name = await conn.scalar(sqlalchemy.text(WHO_AM_I))
            path = await conn.scalar(sqlalchemy.text("SELECT current_setting('search_path')"))
            return name, path
    finally:
        await engine.dispose()


def test_async_application_name(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    name, _ = asyncio.run(async_names(postgres_dsn))
    assert name == "poolaware-gw1"


def test_async_server_settings_are_merged(postgres_dsn: str) -> None:
    settings = {"server_settings": {"search_path": "elsewhere"}}
    assert asyncio.run(async_names(postgres_dsn, connect_args=settings)) == (
        "poolaware-main",
        "elsewhere",
    )
    settings = {"server_settings": {"application_name": "mine"}}
    assert asyncio.run(async_names(postgres_dsn, connect_args=settings))[0] == "mine"
