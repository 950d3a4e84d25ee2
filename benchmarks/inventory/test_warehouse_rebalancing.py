"""Warehouse rebalancing: ``TestWarehouseRebalancing`` is serial_only (one session per
warehouse, WAREHOUSES connections at once, each booking its outgoing transfer while the
carrier and the receiving site confirm); the request validation tests are unmarked and
light.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import IntegrityError
from support import (
    HEAVY_STEP_SECONDS,
    LIGHT_STEP_SECONDS,
    hold_sync,
    on_hand,
    simulate_latency,
    stock,
    unique,
)

#: Warehouses rebalanced at once, one session each.
WAREHOUSES: Final = 7


def _ship_out(batch: str, sku: str, site: str, to: str, units: int) -> Callable[[Connection], bool]:
    """One site's outgoing transfer: False when it has too little stock to send."""

    def step(conn: Connection) -> bool:
        simulate_latency(conn, HEAVY_STEP_SECONDS)  # carrier booking
        try:
            with conn.begin_nested():
                conn.execute(
                    text(
                        "UPDATE stock_levels SET on_hand = on_hand - :n "
                        "WHERE warehouse = :w AND sku = :s"
                    ),
                    {"n": units, "w": site, "s": sku},
                )
        except IntegrityError:  # on_hand >= 0
            return False
        conn.execute(
            text(
                "INSERT INTO stock_movements (warehouse, sku, delta, reason, batch) "
                "VALUES (:w, :s, -:n, 'rebalance-out', :b), (:to, :s, :n, 'rebalance-in', :b)"
            ),
            {"w": site, "to": to, "s": sku, "n": units, "b": batch},
        )
        simulate_latency(conn, HEAVY_STEP_SECONDS)  # receiving site's confirmation
        return True

    return step


def _rebalance(
    engine: Engine, initial: Sequence[int], outgoing: Sequence[int]
) -> tuple[str, str, list[str], list[bool]]:
    """Site i sends outgoing[i] units to site i + 1 (the last to the first), all at once;
    the receipts are booked after. Returns (sku, batch, sites, shipped)."""
    sku, batch = unique("sku"), unique("rebalance")
    sites = [unique(f"wh{i}") for i in range(WAREHOUSES)]
    with engine.begin() as conn:
        for site, units in zip(sites, initial, strict=True):
            stock(conn, site, sku, units)
    shipped = hold_sync(
        engine,
        [
            _ship_out(batch, sku, site, sites[(i + 1) % WAREHOUSES], outgoing[i])
            for i, site in enumerate(sites)
        ],
    )
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE stock_levels AS l SET on_hand = l.on_hand + m.units "
                "FROM (SELECT warehouse, sum(delta) AS units FROM stock_movements "
                "      WHERE batch = :b AND reason = 'rebalance-in' GROUP BY warehouse) AS m "
                "WHERE l.warehouse = m.warehouse AND l.sku = :s"
            ),
            {"b": batch, "s": sku},
        )
    return sku, batch, sites, shipped


@pytest.mark.integration
@pytest.mark.serial_only
class TestWarehouseRebalancing:
    def test_total_stock_is_preserved(self, db_engine: Engine) -> None:
        initial = [40, 10, 25, 5, 60, 0, 15]
        sku, _, sites, shipped = _rebalance(db_engine, initial, [10, 2, 5, 1, 20, 0, 3])
        assert all(shipped)
        with db_engine.connect() as conn:
            assert sum(on_hand(conn, site, sku) for site in sites) == sum(initial)

    def test_each_site_receives_from_its_neighbour(self, db_engine: Engine) -> None:
        initial = [30] * WAREHOUSES
        outgoing = [1, 2, 3, 4, 5, 6, 7]
        sku, _, sites, _ = _rebalance(db_engine, initial, outgoing)
        with db_engine.connect() as conn:
            levels = [on_hand(conn, site, sku) for site in sites]
        assert levels == [30 - outgoing[i] + outgoing[i - 1] for i in range(WAREHOUSES)]

    def test_movements_come_in_balanced_pairs(self, db_engine: Engine) -> None:
        _, batch, _, _ = _rebalance(db_engine, [20] * WAREHOUSES, [4] * WAREHOUSES)
        with db_engine.connect() as conn:
            count, net = conn.execute(
                text("SELECT count(*), sum(delta) FROM stock_movements WHERE batch = :b"),
                {"b": batch},
            ).one()
        assert (count, net) == (2 * WAREHOUSES, 0)

    def test_a_site_never_ships_stock_it_does_not_have(self, db_engine: Engine) -> None:
        initial = [5, 5, 5, 5, 5, 5, 5]
        sku, batch, sites, shipped = _rebalance(db_engine, initial, [3, 9, 3, 3, 3, 3, 3])
        assert shipped == [True, False, True, True, True, True, True]
        with db_engine.connect() as conn:
            assert on_hand(conn, sites[1], sku) == 5 + 3
            sent = conn.execute(
                text("SELECT count(*) FROM stock_movements WHERE batch = :b AND warehouse = :w"),
                {"b": batch, "w": sites[2]},
            ).scalar_one()
        assert sent == 1  # its own departure only: site 1 sent it nothing


@pytest.mark.integration
@pytest.mark.parametrize(
    ("units", "valid"),
    [(1, True), (5, True), (40, True), (120, True), (500, True), (999, True),
     (0, False), (-1, False), (-40, False), (1000, False), (5000, False), (10**6, False)],
)  # fmt: skip
def test_transfer_request_validation(db_engine: Engine, units: int, valid: bool) -> None:
    with db_engine.connect() as conn:
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        accepted = conn.execute(text("SELECT :n BETWEEN 1 AND 999"), {"n": units}).scalar_one()
    assert accepted is valid
