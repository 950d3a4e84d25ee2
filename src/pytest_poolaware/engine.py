"""SQLAlchemy engines sized by PG_POOL_SIZE/PG_MAX_OVERFLOW/PG_POOL_TIMEOUT, tagged per worker."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy
from sqlalchemy.pool import QueuePool

from pytest_poolaware.shared.dsn import APPLICATION_NAME_PREFIX
from pytest_poolaware.shared.settings import PoolSettings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

#: Set by pytest-xdist in each worker (``gw0``, ``gw1``...); absent in the main process.
ENV_XDIST_WORKER: Final = "PYTEST_XDIST_WORKER"
SYNC_DRIVER: Final = "psycopg"
ASYNC_DRIVER: Final = "asyncpg"
_POSTGRES_BACKENDS: Final = ("postgresql", "postgres")


def application_name(environ: Mapping[str, str] | None = None) -> str:
    """``poolaware-gw3`` in xdist worker gw3, ``poolaware-main`` elsewhere."""
    env = os.environ if environ is None else environ
    return f"{APPLICATION_NAME_PREFIX}{env.get(ENV_XDIST_WORKER) or 'main'}"


def _with_driver(url: str | sqlalchemy.URL, driver: str) -> sqlalchemy.URL:
    """Give a plain ``postgresql://`` (or libpq's ``postgres://``) URL our default driver."""
    parsed = sqlalchemy.make_url(url)
    backend, _, explicit = parsed.drivername.partition("+")
    if backend not in _POSTGRES_BACKENDS:
        raise ValueError(f"expected a PostgreSQL URL, got {parsed.drivername}://")
    return parsed.set(drivername=f"postgresql+{explicit or driver}")


def _engine_kwargs(
    url: sqlalchemy.URL, settings: PoolSettings | None, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Pool sizing and application_name under the caller's own keyword arguments."""
    pools = settings if settings is not None else PoolSettings.from_env()
    options: dict[str, Any] = {}
    pool_class = kwargs.get("poolclass", QueuePool)
    # NullPool, StaticPool... reject sizing arguments; a ready-made ``pool`` ignores them.
    if "pool" not in kwargs and issubclass(pool_class, QueuePool):
        options.update(
            pool_size=pools.pool_size,
            max_overflow=pools.max_overflow,
            pool_timeout=pools.pool_timeout,
        )
    options.update(kwargs)
    name = application_name()
    connect_args = dict(kwargs.get("connect_args") or {})
    if url.get_driver_name() == "asyncpg":
        connect_args["server_settings"] = {
            "application_name": name,
            **(connect_args.get("server_settings") or {}),
        }
    else:
        connect_args.setdefault("application_name", name)
    options["connect_args"] = connect_args
    return options


def make_engine(
    url: str | sqlalchemy.URL, *, settings: PoolSettings | None = None, **kwargs: Any
) -> sqlalchemy.Engine:
    """A sync engine (psycopg unless the URL names a driver); ``kwargs`` override our defaults.

    Without ``settings`` the pool follows the environment, raising ConfigError on bad values.
    """
    parsed = _with_driver(url, SYNC_DRIVER)
    return sqlalchemy.create_engine(parsed, **_engine_kwargs(parsed, settings, kwargs))


def make_async_engine(
    url: str | sqlalchemy.URL, *, settings: PoolSettings | None = None, **kwargs: Any
) -> AsyncEngine:
    """Like :func:`make_engine`, async (asyncpg unless the URL names a driver)."""
    # Imported here so that sync users need neither greenlet nor the asyncio extension.
    from sqlalchemy.ext.asyncio import create_async_engine

    parsed = _with_driver(url, ASYNC_DRIVER)
    return create_async_engine(parsed, **_engine_kwargs(parsed, settings, kwargs))
