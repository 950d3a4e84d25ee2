"""Phase-1 smoke tests. Only ``TestDatabaseMigrations`` is marked serial_only (heavy,
information_schema checks over several connections); the other classes are unmarked and
light, as in the write-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

import pytest
from sqlalchemy import Connection, Engine, text
from support import HEAVY_STEP_SECONDS, LIGHT_STEP_SECONDS, hold_sync, simulate_latency, unique

#: Migration scripts applied at once, one connection each (like a parallel migrator).
MIGRATORS: Final = 6


def _migration(table: str) -> Callable[[Connection], str]:
    def step(conn: Connection) -> str:
        conn.execute(
            text(
                f"CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                f"parent_id bigint REFERENCES {table}(id), payload jsonb, "
                "created_at timestamptz NOT NULL DEFAULT now())"
            )
        )
        conn.execute(text(f"CREATE INDEX {table}_parent_idx ON {table} (parent_id)"))
        simulate_latency(conn, HEAVY_STEP_SECONDS)  # data backfill
        return table

    return step


@pytest.fixture
def migrated_tables(db_engine: Engine) -> Iterator[list[str]]:
    """Apply MIGRATORS migrations concurrently; drop the tables after the test."""
    tables = [unique("mig") for _ in range(MIGRATORS)]
    try:
        yield hold_sync(db_engine, [_migration(t) for t in tables])
    finally:
        with db_engine.begin() as conn:
            for table in tables:
                conn.execute(text(f"DROP TABLE IF EXISTS {table}"))


@pytest.mark.integration
@pytest.mark.serial_only
class TestDatabaseMigrations:
    def test_tables_exist_in_information_schema(
        self, db_engine: Engine, migrated_tables: list[str]
    ) -> None:
        with db_engine.connect() as conn:
            found = (
                conn.execute(
                    text(
                        "SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = current_schema() AND table_name = ANY(:t)"
                    ),
                    {"t": migrated_tables},
                )
                .scalars()
                .all()
            )
        assert sorted(found) == sorted(migrated_tables)

    def test_column_types(self, db_engine: Engine, migrated_tables: list[str]) -> None:
        def columns(table: str) -> Callable[[Connection], dict[str, str]]:
            def step(conn: Connection) -> dict[str, str]:
                simulate_latency(conn, HEAVY_STEP_SECONDS)
                rows = conn.execute(
                    text(
                        "SELECT column_name, data_type FROM information_schema.columns "
                        "WHERE table_schema = current_schema() AND table_name = :t"
                    ),
                    {"t": table},
                ).all()
                return {r[0]: r[1] for r in rows}

            return step

        for found in hold_sync(db_engine, [columns(t) for t in migrated_tables]):
            assert found == {
                "id": "bigint",
                "parent_id": "bigint",
                "payload": "jsonb",
                "created_at": "timestamp with time zone",
            }

    def test_foreign_keys_are_self_referential(
        self, db_engine: Engine, migrated_tables: list[str]
    ) -> None:
        with db_engine.connect() as conn:
            targets = (
                conn.execute(
                    text(
                        "SELECT ccu.table_name FROM information_schema.table_constraints tc "
                        "JOIN information_schema.constraint_column_usage ccu "
                        "USING (constraint_schema, constraint_name) "
                        "WHERE tc.constraint_type = 'FOREIGN KEY' AND tc.table_name = ANY(:t)"
                    ),
                    {"t": migrated_tables},
                )
                .scalars()
                .all()
            )
            simulate_latency(conn, HEAVY_STEP_SECONDS)
        assert sorted(targets) == sorted(migrated_tables)


@pytest.mark.integration
class TestHealthChecks:
    @pytest.mark.parametrize("probe", ["liveness", "readiness", "startup", "db", "migrations"])
    def test_probe(self, db_engine: Engine, probe: str) -> None:
        with db_engine.connect() as conn:
            simulate_latency(conn, LIGHT_STEP_SECONDS)
            assert conn.execute(text("SELECT :p"), {"p": probe}).scalar_one() == probe


@pytest.mark.integration
class TestSettings:
    @pytest.mark.parametrize("name", ["server_version_num", "TimeZone", "DateStyle"])
    def test_server_setting_readable(self, db_engine: Engine, name: str) -> None:
        with db_engine.connect() as conn:
            simulate_latency(conn, LIGHT_STEP_SECONDS)
            assert conn.execute(text("SELECT current_setting(:n)"), {"n": name}).scalar_one()
