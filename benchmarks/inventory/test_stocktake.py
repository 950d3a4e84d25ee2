"""Nightly stocktake: ``TestNightlyStocktake`` is serial_only (one counting team per
zone, ZONES connections at once, each holding its zone's rows while it counts); the
cycle-count API tests are light and parallel_safe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

#: Zones of the site counted at once, one session each.
ZONES: Final = 6
#: What the system believes each zone holds before the count.
BOOKED: Final = 50


def _count_zone(site: str, sku: str, batch: str, counted: int) -> Callable[[Connection], int]:
    """Count one zone: lock its row, scan, post the difference as an adjustment."""

    def step(conn: Connection) -> int:
        booked = conn.execute(
            text("SELECT on_hand FROM stock_levels WHERE warehouse = :w AND sku = :s FOR UPDATE"),
            {"w": site, "s": sku},
        ).scalar_one()
        simulate_latency(conn, HEAVY_STEP_SECONDS)  # handheld scanners walk the zone
        difference = counted - int(booked)
        if difference:
            conn.execute(
                text(
                    "INSERT INTO stock_movements (warehouse, sku, delta, reason, batch) "
                    "VALUES (:w, :s, :d, 'stocktake', :b)"
                ),
                {"w": site, "s": sku, "d": difference, "b": batch},
            )
            conn.execute(
                text("UPDATE stock_levels SET on_hand = :n WHERE warehouse = :w AND sku = :s"),
                {"n": counted, "w": site, "s": sku},
            )
        simulate_latency(conn, HEAVY_STEP_SECONDS)  # supervisor sign-off
        return difference

    return step


def _stocktake(engine: Engine, counted: Sequence[int]) -> tuple[str, list[str], list[int]]:
    """Book BOOKED units per zone, count every zone at once; (batch, skus, differences)."""
    site, batch = unique("site"), unique("stocktake")
    skus = [unique(f"zone{z}") for z in range(ZONES)]
    with engine.begin() as conn:
        for sku in skus:
            stock(conn, site, sku, BOOKED)
    differences = hold_sync(
        engine, [_count_zone(site, sku, batch, n) for sku, n in zip(skus, counted, strict=True)]
    )
    return site, skus, differences


@pytest.mark.integration
@pytest.mark.serial_only
class TestNightlyStocktake:
    def test_an_exact_count_posts_nothing(self, db_engine: Engine) -> None:
        _, _, differences = _stocktake(db_engine, [BOOKED] * ZONES)
        assert differences == [0] * ZONES

    def test_shrinkage_is_posted_as_a_negative_adjustment(self, db_engine: Engine) -> None:
        _, _, differences = _stocktake(db_engine, [BOOKED - z for z in range(ZONES)])
        assert differences == [-z for z in range(ZONES)]

    def test_found_stock_is_posted_as_a_positive_adjustment(self, db_engine: Engine) -> None:
        _, _, differences = _stocktake(db_engine, [BOOKED + 3] * ZONES)
        assert differences == [3] * ZONES

    def test_counted_quantities_become_on_hand(self, db_engine: Engine) -> None:
        counted = [0, 12, 49, 50, 51, 200]
        site, skus, _ = _stocktake(db_engine, counted)
        with db_engine.connect() as conn:
            assert [on_hand(conn, site, sku) for sku in skus] == counted


@pytest.mark.integration
@pytest.mark.parallel_safe
class TestCycleCountApi:
    @pytest.mark.parametrize("zone", [f"{aisle}{bay}" for aisle in "ABCD" for bay in range(1, 5)])
    def test_count_sheet_lists_the_zone(self, db_engine: Engine, zone: str) -> None:
        site, sku = unique("site"), unique(f"sku_{zone}")
        with db_engine.connect() as conn, conn.begin() as tx:
            stock(conn, site, sku, 7)
            simulate_latency(conn, LIGHT_STEP_SECONDS)
            sheet = conn.execute(
                text("SELECT sku, on_hand FROM stock_levels WHERE warehouse = :w"), {"w": site}
            ).all()
            tx.rollback()
        assert [tuple(row) for row in sheet] == [(sku, 7)]
