"""Checkout: the order service and the stock service each take a session, so a checkout
holds two connections at once (light, parallel_safe); price quotes hold one. The flash
sale is unmarked and heavy: FLASH_SALE_BUYERS checkouts at once race for the last units.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import pytest
from sqlalchemy import Connection, Engine, text
from support import (
    HEAVY_STEP_SECONDS,
    LIGHT_STEP_SECONDS,
    hold_sync,
    on_hand,
    simulate_latency,
    stock,
    unique,
)

#: Buyers checking out at once in the flash sale, one session each.
FLASH_SALE_BUYERS: Final = 6
#: Units left when the flash sale opens.
FLASH_SALE_UNITS: Final = 4


def _place_order(order: str, sku: str, qty: int) -> Callable[[Connection], bool]:
    def step(conn: Connection) -> bool:
        conn.execute(text("INSERT INTO orders (id, customer) VALUES (:o, 'web')"), {"o": order})
        conn.execute(
            text("INSERT INTO order_lines (order_id, sku, qty) VALUES (:o, :s, :q)"),
            {"o": order, "s": sku, "q": qty},
        )
        simulate_latency(conn, LIGHT_STEP_SECONDS)  # payment authorisation
        return True

    return step


def _reserve(warehouse: str, sku: str, qty: int) -> Callable[[Connection], bool]:
    def step(conn: Connection) -> bool:
        simulate_latency(conn, LIGHT_STEP_SECONDS)  # stock service round trip
        reserved = conn.execute(
            text(
                "UPDATE stock_levels SET reserved = reserved + :q "
                "WHERE warehouse = :w AND sku = :s AND on_hand - reserved >= :q"
            ),
            {"q": qty, "w": warehouse, "s": sku},
        )
        return reserved.rowcount == 1

    return step


@pytest.mark.integration
@pytest.mark.parallel_safe
@pytest.mark.parametrize(
    ("available", "qty"),
    [(1, 1), (2, 1), (5, 3), (5, 5), (10, 1), (10, 9), (25, 12), (100, 40), (3, 4), (0, 1),
     (7, 8), (1, 2), (50, 50), (50, 51), (12, 6), (12, 13), (8, 2), (8, 9), (30, 15),
     (30, 31)],
)  # fmt: skip
def test_checkout_reserves_stock(db_engine: Engine, available: int, qty: int) -> None:
    warehouse, sku, order = unique("wh"), unique("sku"), unique("ord")
    with db_engine.begin() as conn:
        stock(conn, warehouse, sku, available)
    placed, reserved = hold_sync(
        db_engine, [_place_order(order, sku, qty), _reserve(warehouse, sku, qty)]
    )
    assert placed
    assert reserved is (qty <= available)


@pytest.mark.integration
@pytest.mark.parallel_safe
@pytest.mark.parametrize("qty", [1, 2, 3, 5, 9, 10, 11, 24, 25, 49, 50, 100])
def test_price_quote_applies_volume_discount(db_engine: Engine, qty: int) -> None:
    with db_engine.connect() as conn:
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        total = conn.execute(
            text(
                "SELECT :q * 1000 * CASE WHEN :q >= 50 THEN 80 WHEN :q >= 10 THEN 90 "
                "ELSE 100 END / 100"
            ),
            {"q": qty},
        ).scalar_one()
    discount = 80 if qty >= 50 else 90 if qty >= 10 else 100
    assert total == qty * 1000 * discount // 100


@pytest.mark.integration
def test_flash_sale_checkout_burst(db_engine: Engine) -> None:
    warehouse, sku = unique("wh"), unique("flash")
    with db_engine.begin() as conn:
        stock(conn, warehouse, sku, FLASH_SALE_UNITS)

    def buyer(conn: Connection) -> bool:
        simulate_latency(conn, HEAVY_STEP_SECONDS)  # fraud screening
        simulate_latency(conn, HEAVY_STEP_SECONDS)  # payment authorisation
        # Last, so the row lock is held only until this buyer's commit.
        won = conn.execute(
            text(
                "UPDATE stock_levels SET on_hand = on_hand - 1 "
                "WHERE warehouse = :w AND sku = :s AND on_hand > 0"
            ),
            {"w": warehouse, "s": sku},
        ).rowcount
        return won == 1

    outcomes = hold_sync(db_engine, [buyer] * FLASH_SALE_BUYERS)
    assert outcomes.count(True) == FLASH_SALE_UNITS
    with db_engine.connect() as conn:
        assert on_hand(conn, warehouse, sku) == 0
