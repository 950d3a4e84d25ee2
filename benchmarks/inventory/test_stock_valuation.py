"""Stock valuation tests nobody marked. All light, except
``test_end_of_day_stock_valuation``: it values VALUATION_SITES warehouses at once, one
connection each, and being unmarked it lands in the parallel pass of a two-pass split,
where it needs nearly the whole connection limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import pytest
from sqlalchemy import Connection, Engine, text
from support import HEAVY_STEP_SECONDS, LIGHT_STEP_SECONDS, hold_sync, simulate_latency, unique

pytestmark = pytest.mark.integration

#: Warehouses valued at once, one connection each.
VALUATION_SITES: Final = 12
#: Products stocked in every warehouse, with their unit costs in cents.
UNIT_COSTS: Final = (250, 1_999, 45, 12_000, 780)


def _value(site: str) -> Callable[[Connection], int]:
    def step(conn: Connection) -> int:
        simulate_latency(conn, HEAVY_STEP_SECONDS)  # fetch the day's landed costs
        value = conn.execute(
            text(
                "SELECT sum(l.on_hand * p.unit_cost_cents) FROM stock_levels AS l "
                "JOIN products AS p USING (sku) WHERE l.warehouse = :w"
            ),
            {"w": site},
        ).scalar_one()
        simulate_latency(conn, HEAVY_STEP_SECONDS)  # post to the general ledger
        return int(value)

    return step


def test_end_of_day_stock_valuation(db_engine: Engine) -> None:
    sites = [unique(f"site{n}") for n in range(VALUATION_SITES)]
    skus = [unique("val") for _ in UNIT_COSTS]
    with db_engine.begin() as conn:
        for sku, cost in zip(skus, UNIT_COSTS, strict=True):
            conn.execute(
                text("INSERT INTO products (sku, name, unit_cost_cents) VALUES (:s, :s, :c)"),
                {"s": sku, "c": cost},
            )
        for n, site in enumerate(sites):
            conn.execute(
                text(
                    "INSERT INTO stock_levels (warehouse, sku, on_hand) "
                    "SELECT :w, sku, :n FROM unnest(CAST(:skus AS text[])) AS sku"
                ),
                {"w": site, "n": n + 1, "skus": skus},
            )
    values = hold_sync(db_engine, [_value(site) for site in sites])
    assert values == [(n + 1) * sum(UNIT_COSTS) for n in range(VALUATION_SITES)]


@pytest.mark.parametrize(
    ("cents", "shown"),
    [(0, "0.00"), (1, "0.01"), (99, "0.99"), (100, "1.00"), (12_345, "123.45"),
     (1_000_000, "10000.00"), (5, "0.05"), (250, "2.50"), (1_999, "19.99"), (45, "0.45")],
)  # fmt: skip
def test_unit_cost_is_shown_in_currency_units(db_engine: Engine, cents: int, shown: str) -> None:
    with db_engine.connect() as conn:
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        formatted = conn.execute(
            text("SELECT to_char(:c / 100.0, 'FM9999990.00')"), {"c": cents}
        ).scalar_one()
    assert formatted == shown


@pytest.mark.parametrize("currency", ["EUR", "USD", "GBP", "CHF", "SEK", "PLN"])
def test_valuation_report_names_its_currency(db_engine: Engine, currency: str) -> None:
    with db_engine.connect() as conn:
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        heading = conn.execute(
            text("SELECT 'Stock value (' || :c || ')'"), {"c": currency}
        ).scalar_one()
    assert heading == f"Stock value ({currency})"
