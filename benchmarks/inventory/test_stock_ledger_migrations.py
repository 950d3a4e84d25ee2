"""Stock-ledger migrations: ``TestStockLedgerMigrations`` is serial_only (one migrator
per ledger partition, LEDGER_PARTITIONS connections at once, DDL on shared catalogs);
``TestLedgerHealth`` is unmarked and light.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import IntegrityError
from support import HEAVY_STEP_SECONDS, LIGHT_STEP_SECONDS, hold_sync, simulate_latency, unique

#: Ledger partitions migrated at once, one connection each (like a parallel migrator).
LEDGER_PARTITIONS: Final = 8
#: Legacy ledger rows backfilled into each partition.
BACKFILL_ROWS: Final = 120


def _migrate(table: str) -> Callable[[Connection], str]:
    def step(conn: Connection) -> str:
        conn.execute(
            text(
                f"CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                "sku text NOT NULL, delta integer NOT NULL CHECK (delta <> 0), "
                "booked_at timestamptz NOT NULL DEFAULT now())"
            )
        )
        conn.execute(text(f"CREATE INDEX {table}_sku_idx ON {table} (sku)"))
        conn.execute(
            text(
                f"INSERT INTO {table} (sku, delta) "
                "SELECT 'sku_' || (g % 10), CASE WHEN g % 3 = 0 THEN -g ELSE g END "
                "FROM generate_series(1, :n) AS g"
            ),
            {"n": BACKFILL_ROWS},
        )
        simulate_latency(conn, HEAVY_STEP_SECONDS)  # backfill from the legacy ledger
        return table

    return step


def _verify(query: str) -> Callable[[str], Callable[[Connection], int]]:
    """A per-partition check: the verifier's wait, then one scalar query on the partition."""

    def for_table(table: str) -> Callable[[Connection], int]:
        def step(conn: Connection) -> int:
            simulate_latency(conn, HEAVY_STEP_SECONDS)  # checksum against the legacy ledger
            return int(conn.execute(text(query.format(table=table))).scalar_one())

        return step

    return for_table


@pytest.fixture
def ledger_partitions(db_engine: Engine) -> Iterator[list[str]]:
    """Migrate LEDGER_PARTITIONS partitions concurrently; drop them after the test."""
    tables = [unique("ledger") for _ in range(LEDGER_PARTITIONS)]
    try:
        yield hold_sync(db_engine, [_migrate(t) for t in tables])
    finally:
        with db_engine.begin() as conn:
            for table in tables:
                conn.execute(text(f"DROP TABLE IF EXISTS {table}"))


@pytest.mark.integration
@pytest.mark.serial_only
class TestStockLedgerMigrations:
    def test_every_partition_is_backfilled(
        self, db_engine: Engine, ledger_partitions: list[str]
    ) -> None:
        count = _verify("SELECT count(*) FROM {table}")
        assert (
            hold_sync(db_engine, [count(t) for t in ledger_partitions])
            == [BACKFILL_ROWS] * LEDGER_PARTITIONS
        )

    def test_backfill_preserves_the_net_movement(
        self, db_engine: Engine, ledger_partitions: list[str]
    ) -> None:
        net = _verify("SELECT sum(delta) FROM {table}")
        expected = sum(-g if g % 3 == 0 else g for g in range(1, BACKFILL_ROWS + 1))
        assert (
            hold_sync(db_engine, [net(t) for t in ledger_partitions])
            == [expected] * LEDGER_PARTITIONS
        )

    def test_every_sku_is_indexed(self, db_engine: Engine, ledger_partitions: list[str]) -> None:
        indexes = _verify(
            "SELECT count(*) FROM pg_indexes "
            "WHERE schemaname = current_schema() AND tablename = '{table}'"
        )
        # The primary key's index and the sku index.
        assert (
            hold_sync(db_engine, [indexes(t) for t in ledger_partitions]) == [2] * LEDGER_PARTITIONS
        )

    def test_zero_movements_are_rejected(
        self, db_engine: Engine, ledger_partitions: list[str]
    ) -> None:
        def insert_zero(table: str) -> Callable[[Connection], bool]:
            def step(conn: Connection) -> bool:
                simulate_latency(conn, HEAVY_STEP_SECONDS)  # replaying the legacy rejects
                try:
                    with conn.begin_nested():
                        conn.execute(text(f"INSERT INTO {table} (sku, delta) VALUES ('x', 0)"))
                except IntegrityError:
                    return True
                return False

            return step

        assert all(hold_sync(db_engine, [insert_zero(t) for t in ledger_partitions]))


@pytest.mark.integration
class TestLedgerHealth:
    @pytest.mark.parametrize(
        "reason",
        ["receipt", "sale", "return", "transfer", "adjustment", "damage", "sample", "recount"],
    )
    def test_movement_reason_is_recorded(self, db_engine: Engine, reason: str) -> None:
        with db_engine.connect() as conn, conn.begin() as tx:
            batch = unique("health")
            conn.execute(
                text(
                    "INSERT INTO stock_movements (warehouse, sku, delta, reason, batch) "
                    "VALUES ('main', 'sku_health', 1, :r, :b)"
                ),
                {"r": reason, "b": batch},
            )
            simulate_latency(conn, LIGHT_STEP_SECONDS)
            stored = conn.execute(
                text("SELECT reason FROM stock_movements WHERE batch = :b"), {"b": batch}
            ).scalar_one()
            tx.rollback()
        assert stored == reason
