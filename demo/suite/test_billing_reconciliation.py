"""Billing tests nobody marked. All light, except ``test_month_end_reconciliation``: it
fans out over RECONCILE_PARTITIONS connections at once, and being unmarked it lands in
the parallel pass of today's two-pass CI, where it breaks the connection limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import pytest
from sqlalchemy import Connection, Engine, text
from support import HEAVY_STEP_SECONDS, LIGHT_STEP_SECONDS, hold_sync, simulate_latency, unique

pytestmark = pytest.mark.integration

#: Billing partitions reconciled at once, one connection each.
RECONCILE_PARTITIONS: Final = 12
#: Invoices written per partition.
INVOICES_PER_PARTITION: Final = 25


def _reconcile(batch: str, partition: int) -> Callable[[Connection], int]:
    def step(conn: Connection) -> int:
        prefix = unique(f"inv{partition}")
        conn.execute(
            text(
                "INSERT INTO invoices (id, customer_id, amount_cents, batch) "
                "SELECT :p || '_' || g, 'cust_' || (g % 7), 100 * g, :b "
                "FROM generate_series(1, :n) AS g"
            ),
            {"p": prefix, "b": batch, "n": INVOICES_PER_PARTITION},
        )
        simulate_latency(conn, HEAVY_STEP_SECONDS)  # payment gateway settlement
        simulate_latency(conn, HEAVY_STEP_SECONDS)  # ledger export
        total = conn.execute(
            # This partition's rows only (LIKE would treat "_" as a wildcard: inv1_ would
            # also match the inv10_ rows another thread may have committed meanwhile).
            text(
                "SELECT sum(amount_cents) FROM invoices "
                "WHERE batch = :b AND starts_with(id, :p || '_')"
            ),
            {"b": batch, "p": prefix},
        ).scalar_one()
        return int(total)

    return step


def test_month_end_reconciliation(db_engine: Engine) -> None:
    batch = unique("month_end")
    totals = hold_sync(db_engine, [_reconcile(batch, p) for p in range(RECONCILE_PARTITIONS)])
    per_partition = 100 * INVOICES_PER_PARTITION * (INVOICES_PER_PARTITION + 1) // 2
    assert totals == [per_partition] * RECONCILE_PARTITIONS
    with db_engine.connect() as conn:
        grand = conn.execute(
            text("SELECT sum(amount_cents) FROM invoices WHERE batch = :b"), {"b": batch}
        ).scalar_one()
    assert grand == per_partition * RECONCILE_PARTITIONS


@pytest.mark.parametrize("amount", [0, 1, 99, 100, 12_345, 10**9])
def test_invoice_amount_roundtrip(db_engine: Engine, amount: int) -> None:
    with db_engine.connect() as conn, conn.begin() as tx:
        invoice = unique("inv")
        conn.execute(
            text(
                "INSERT INTO invoices (id, customer_id, amount_cents, batch) "
                "VALUES (:i, 'c', :a, 'single')"
            ),
            {"i": invoice, "a": amount},
        )
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        stored = conn.execute(
            text("SELECT amount_cents FROM invoices WHERE id = :i"), {"i": invoice}
        ).scalar_one()
        tx.rollback()
    assert stored == amount


@pytest.mark.parametrize("currency", ["EUR", "USD", "GBP", "NGN"])
def test_currency_formatting(db_engine: Engine, currency: str) -> None:
    with db_engine.connect() as conn:
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        formatted = conn.execute(
            text("SELECT to_char(12345 / 100.0, 'FM999990.00') || ' ' || :c"), {"c": currency}
        ).scalar_one()
    assert formatted == f"123.45 {currency}"
