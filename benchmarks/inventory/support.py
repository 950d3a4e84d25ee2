"""Helpers shared by the inventory tests: schema, unique names, and "hold N connections
at once" (the demo's mechanism: one thread and one pooled connection per unit of work,
all checked out together, each waiting on the server for a simulated downstream call).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

from sqlalchemy import Connection, Engine, text

T = TypeVar("T")

#: Simulated latency of one step of a heavy job (a carrier API, a backfill, a recount).
HEAVY_STEP_SECONDS: Final = 0.3
#: Simulated latency of one light request (an API call backed by one query).
LIGHT_STEP_SECONDS: Final = 0.1
#: Advisory lock key serializing the schema setup across xdist workers.
SCHEMA_LOCK_KEY: Final = 0x494E5654

SCHEMA: Final = (
    # A schema named after the role: first on the default search_path ("$user", public),
    # so every run's role gets its own tables whoever owns the ones in public.
    "CREATE SCHEMA IF NOT EXISTS AUTHORIZATION CURRENT_USER",
    """CREATE TABLE IF NOT EXISTS products (
        sku text PRIMARY KEY, name text NOT NULL, unit_cost_cents bigint NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS stock_levels (
        warehouse text NOT NULL, sku text NOT NULL,
        on_hand integer NOT NULL CHECK (on_hand >= 0),
        reserved integer NOT NULL DEFAULT 0 CHECK (reserved >= 0),
        PRIMARY KEY (warehouse, sku))""",
    """CREATE TABLE IF NOT EXISTS stock_movements (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, warehouse text NOT NULL,
        sku text NOT NULL, delta integer NOT NULL, reason text NOT NULL, batch text NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS orders (
        id text PRIMARY KEY, customer text NOT NULL, status text NOT NULL DEFAULT 'placed')""",
    """CREATE TABLE IF NOT EXISTS order_lines (
        order_id text NOT NULL REFERENCES orders(id) ON DELETE CASCADE, sku text NOT NULL,
        qty integer NOT NULL CHECK (qty > 0), PRIMARY KEY (order_id, sku))""",
    """CREATE TABLE IF NOT EXISTS shipments (
        id text PRIMARY KEY, order_id text NOT NULL REFERENCES orders(id) ON DELETE CASCADE,
        carrier text NOT NULL, label text NOT NULL)""",
)


def unique(prefix: str) -> str:
    """A name no other test (or rerun, or worker) uses, so tests never collide."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


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


def simulate_latency(conn: Connection, seconds: float) -> None:
    """Server-side wait standing in for a slow downstream call made inside the transaction."""
    conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})


def stock(conn: Connection, warehouse: str, sku: str, on_hand: int) -> None:
    """Put ``on_hand`` units of ``sku`` on the shelves of ``warehouse``."""
    conn.execute(
        text("INSERT INTO stock_levels (warehouse, sku, on_hand) VALUES (:w, :s, :n)"),
        {"w": warehouse, "s": sku, "n": on_hand},
    )


def on_hand(conn: Connection, warehouse: str, sku: str) -> int:
    """Units of ``sku`` on the shelves of ``warehouse``."""
    value = conn.execute(
        text("SELECT on_hand FROM stock_levels WHERE warehouse = :w AND sku = :s"),
        {"w": warehouse, "s": sku},
    ).scalar_one()
    return int(value)
