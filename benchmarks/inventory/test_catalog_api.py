"""Catalog API tests: light (one connection per request), parallel_safe."""

from __future__ import annotations

from typing import Final

import pytest
from sqlalchemy import Engine, text
from support import LIGHT_STEP_SECONDS, simulate_latency, unique

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]

CATEGORIES: Final = ("tools", "garden", "kitchen", "lighting", "storage", "paint")
PRODUCTS: Final = (
    "cordless drill", "hammer", "spirit level", "tape measure", "hose reel",
    "pruning shears", "watering can", "chef knife", "cutting board", "saucepan",
    "desk lamp", "led bulb", "floor lamp", "shelf bracket", "storage box",
    "wall hook", "primer", "roller", "masking tape", "paint brush",
    "extension cord", "work gloves", "safety glasses", "ladder", "wheelbarrow",
)  # fmt: skip


@pytest.mark.parametrize("name", PRODUCTS)
def test_product_page_shows_price(db_engine: Engine, name: str) -> None:
    sku = unique("sku")
    with db_engine.connect() as conn, conn.begin() as tx:
        conn.execute(
            text("INSERT INTO products (sku, name, unit_cost_cents) VALUES (:s, :n, :c)"),
            {"s": sku, "n": name, "c": 100 * len(name)},
        )
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        price = conn.execute(
            text(
                "SELECT to_char(unit_cost_cents / 100.0, 'FM99990.00') FROM products WHERE sku = :s"
            ),
            {"s": sku},
        ).scalar_one()
        tx.rollback()
    assert price == f"{len(name)}.00"


@pytest.mark.parametrize("name", PRODUCTS)
def test_search_finds_product_by_word(db_engine: Engine, name: str) -> None:
    sku, word = unique("sku"), name.split()[-1]
    with db_engine.connect() as conn, conn.begin() as tx:
        conn.execute(
            text("INSERT INTO products (sku, name, unit_cost_cents) VALUES (:s, :n, 100)"),
            {"s": sku, "n": name},
        )
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        found = conn.execute(
            text(
                "SELECT sku FROM products WHERE sku = :s "
                "AND to_tsvector('simple', name) @@ plainto_tsquery('simple', :w)"
            ),
            {"s": sku, "w": word},
        ).scalar_one_or_none()
        tx.rollback()
    assert found == sku


@pytest.mark.parametrize("category", CATEGORIES)
def test_category_listing_is_paginated(db_engine: Engine, category: str) -> None:
    with db_engine.connect() as conn:
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        pages = conn.execute(
            text("SELECT count(*) FROM generate_series(1, :n, 20)"), {"n": 7 * len(category)}
        ).scalar_one()
    assert pages == (7 * len(category) - 1) // 20 + 1
