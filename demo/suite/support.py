"""Helpers shared by the demo tests: schema, unique names, and "hold N connections at once".

Heavy tests in the suites this demo imitates fan work out over several sessions at once
(threads for sync code, ``asyncio.gather`` for async code); these helpers do the same so a
heavy test really has several pooled connections checked out together.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from sqlalchemy import Connection, Engine, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

T = TypeVar("T")

#: What the ``run_async`` fixture returns: run a coroutine on the module's event loop.
RunAsync = Callable[[Awaitable[Any]], Any]

#: Simulated latency of one step of a heavy workflow (RADIUS, NetBox, WireGuard, DDL).
HEAVY_STEP_SECONDS: Final = 0.4
#: Simulated latency of one light request (an API call backed by one query).
LIGHT_STEP_SECONDS: Final = 0.04
#: Advisory lock key serializing the schema setup across xdist workers.
SCHEMA_LOCK_KEY: Final = 0x504F4F4C

SCHEMA: Final = (
    # A schema named after the role: first on the default search_path ("$user", public),
    # so every run's role gets its own tables whoever owns the ones in public.
    "CREATE SCHEMA IF NOT EXISTS AUTHORIZATION CURRENT_USER",
    """CREATE TABLE IF NOT EXISTS subscribers (
        id text PRIMARY KEY, tenant text NOT NULL, ipv4 inet, ipv6 inet,
        radius_profile text, status text NOT NULL DEFAULT 'pending')""",
    """CREATE TABLE IF NOT EXISTS radius_accounts (
        username text PRIMARY KEY, subscriber_id text NOT NULL REFERENCES subscribers(id),
        framed_ipv4 inet, delegated_ipv6 cidr)""",
    """CREATE TABLE IF NOT EXISTS netbox_ips (
        address inet NOT NULL, subscriber_id text NOT NULL REFERENCES subscribers(id),
        PRIMARY KEY (subscriber_id, address))""",
    """CREATE TABLE IF NOT EXISTS wireguard_peers (
        public_key text PRIMARY KEY, subscriber_id text NOT NULL REFERENCES subscribers(id),
        allowed_ips cidr[] NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS customers (id text PRIMARY KEY, name text NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS contacts (
        id text PRIMARY KEY, customer_id text NOT NULL REFERENCES customers(id)
        ON DELETE CASCADE, email text NOT NULL, is_primary boolean NOT NULL DEFAULT false)""",
    """CREATE TABLE IF NOT EXISTS invoices (
        id text PRIMARY KEY, customer_id text NOT NULL, amount_cents bigint NOT NULL,
        batch text NOT NULL)""",
)


def unique(prefix: str) -> str:
    """A name no other test (or rerun, or worker) uses, so tests never collide."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def ipv4(index: int) -> str:
    """A CGNAT address for the index-th subscriber of a batch (uniqueness not required)."""
    return f"100.64.{index % 256}.{random.randint(1, 254)}"


def ipv6(index: int) -> str:
    """A documentation-prefix IPv6 address for the index-th subscriber of a batch."""
    return f"2001:db8:{index:x}::{random.randint(1, 0xFFFF):x}"


def create_schema(engine: Engine) -> None:
    """Create the shared tables once; the advisory lock keeps concurrent workers apart."""
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
        for ddl in SCHEMA:
            conn.execute(text(ddl))


def hold_sync(engine: Engine, work: Sequence[Callable[[Connection], T]]) -> list[T]:
    """Run each callable on its own thread and its own connection, all at once."""

    def run(step: Callable[[Connection], T]) -> T:
        with engine.begin() as conn:
            return step(conn)

    with ThreadPoolExecutor(max_workers=len(work)) as pool:
        futures = [pool.submit(run, step) for step in work]
        return [future.result() for future in futures]


async def hold_async(
    engine: AsyncEngine, work: Sequence[Callable[[AsyncConnection], Awaitable[T]]]
) -> list[T]:
    """Run each coroutine function on its own connection, all at once (``asyncio.gather``).

    Every task is awaited to the end before the first error is raised, so no task outlives
    the test and keeps a connection checked out.
    """

    async def run(step: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async with engine.begin() as conn:
            return await step(conn)

    results = await asyncio.gather(*(run(step) for step in work), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [r for r in results if not isinstance(r, BaseException)]


def simulate_latency(conn: Connection, seconds: float) -> None:
    """Server-side wait standing in for a slow downstream call made inside the transaction."""
    conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})


async def simulate_latency_async(conn: AsyncConnection, seconds: float) -> None:
    """Async twin of :func:`simulate_latency`."""
    await conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
