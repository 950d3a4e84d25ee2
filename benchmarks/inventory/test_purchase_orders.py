"""Purchase orders and goods-in: light (one connection per request), parallel_safe."""

from __future__ import annotations

import datetime
from typing import Final

import pytest
from sqlalchemy import Engine, text
from support import LIGHT_STEP_SECONDS, on_hand, simulate_latency, stock, unique

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]

#: Supplier regions and their quoted lead times in days.
LEAD_TIMES: Final = {
    "domestic": 2, "benelux": 3, "dach": 3, "nordics": 4, "iberia": 5, "italy": 4,
    "uk": 5, "poland": 4, "turkey": 9, "china": 35, "vietnam": 38, "india": 30, "us": 14,
}  # fmt: skip


@pytest.mark.parametrize(
    ("ordered", "received"),
    [(10, 10), (10, 7), (10, 0), (1, 1), (24, 12), (24, 24), (100, 99), (100, 100),
     (6, 3), (48, 48), (48, 50), (5, 6), (12, 11), (250, 250)],
)  # fmt: skip
def test_goods_receipt_books_what_arrived(db_engine: Engine, ordered: int, received: int) -> None:
    warehouse, sku = unique("wh"), unique("po")
    with db_engine.connect() as conn, conn.begin() as tx:
        stock(conn, warehouse, sku, 0)
        simulate_latency(conn, LIGHT_STEP_SECONDS)  # supplier's advance shipping notice
        conn.execute(
            text(
                "UPDATE stock_levels SET on_hand = on_hand + :n WHERE warehouse = :w AND sku = :s"
            ),
            {"n": received, "w": warehouse, "s": sku},
        )
        booked = on_hand(conn, warehouse, sku)
        # What stays open on the purchase order: an over-delivery closes it.
        still_open = conn.execute(
            text(
                "SELECT greatest(:o - on_hand, 0) FROM stock_levels "
                "WHERE warehouse = :w AND sku = :s"
            ),
            {"o": ordered, "w": warehouse, "s": sku},
        ).scalar_one()
        tx.rollback()
    assert (booked, still_open) == (received, max(ordered - received, 0))


@pytest.mark.parametrize(("region", "days"), LEAD_TIMES.items(), ids=list(LEAD_TIMES))
def test_expected_delivery_date_uses_the_lead_time(
    db_engine: Engine, region: str, days: int
) -> None:
    with db_engine.connect() as conn:
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        eta = conn.execute(
            text("SELECT DATE '2026-03-02' + CAST(:d AS integer)"), {"d": days}
        ).scalar_one()
    assert eta == datetime.date(2026, 3, 2) + datetime.timedelta(days=days)
