"""Fulfilment tests nobody marked. The packing-slip tests are light; the pick wave, the
carrier label batch and the backorder release each fan out over several sessions at
once (PICKERS, CARRIERS, BACKORDERS connections), and being unmarked they land in the
parallel pass of a two-pass split, beside whatever else runs there.
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

pytestmark = pytest.mark.integration

#: Pickers working one wave at once, one handheld session each.
PICKERS: Final = 5
#: Carriers asked for labels at once, one session each.
CARRIERS: Final = ("dhl", "ups", "fedex", "gls", "dpd", "royal-mail", "postnl")
#: Backordered orders released at once when a delivery arrives, one session each.
BACKORDERS: Final = 6


def _order(conn: Connection, lines: dict[str, int], status: str = "placed") -> str:
    order = unique("ord")
    conn.execute(
        text("INSERT INTO orders (id, customer, status) VALUES (:o, 'acme', :st)"),
        {"o": order, "st": status},
    )
    for sku, qty in lines.items():
        conn.execute(
            text("INSERT INTO order_lines (order_id, sku, qty) VALUES (:o, :s, :q)"),
            {"o": order, "s": sku, "q": qty},
        )
    return order


def test_pick_wave_allocation(db_engine: Engine) -> None:
    warehouse = unique("wh")
    lines = {unique(f"pick{n}"): n + 1 for n in range(PICKERS)}
    with db_engine.begin() as conn:
        for sku in lines:
            stock(conn, warehouse, sku, 10)
        wave = _order(conn, lines)

    def pick(sku: str, qty: int) -> Callable[[Connection], None]:
        def step(conn: Connection) -> None:
            simulate_latency(conn, HEAVY_STEP_SECONDS)  # walk to the bin
            conn.execute(
                text(
                    "UPDATE stock_levels SET on_hand = on_hand - :q "
                    "WHERE warehouse = :w AND sku = :s"
                ),
                {"q": qty, "w": warehouse, "s": sku},
            )
            conn.execute(
                text(
                    "INSERT INTO stock_movements (warehouse, sku, delta, reason, batch) "
                    "VALUES (:w, :s, -:q, 'pick', :b)"
                ),
                {"w": warehouse, "s": sku, "q": qty, "b": wave},
            )
            simulate_latency(conn, HEAVY_STEP_SECONDS)  # scan to tote

        return step

    hold_sync(db_engine, [pick(sku, qty) for sku, qty in lines.items()])
    with db_engine.connect() as conn:
        assert [on_hand(conn, warehouse, sku) for sku in lines] == [
            10 - qty for qty in lines.values()
        ]
        picked = conn.execute(
            text("SELECT count(*) FROM stock_movements WHERE batch = :b"), {"b": wave}
        ).scalar_one()
    assert picked == PICKERS


def test_carrier_label_batch(db_engine: Engine) -> None:
    with db_engine.begin() as conn:
        orders = [_order(conn, {unique("sku"): 1}) for _ in CARRIERS]

    def book(order: str, carrier: str) -> Callable[[Connection], str]:
        def step(conn: Connection) -> str:
            simulate_latency(conn, HEAVY_STEP_SECONDS)  # carrier API: rate the parcel
            label = f"{carrier.upper()}-{unique('lbl')}"
            conn.execute(
                text(
                    "INSERT INTO shipments (id, order_id, carrier, label) VALUES (:i, :o, :c, :l)"
                ),
                {"i": unique("shp"), "o": order, "c": carrier, "l": label},
            )
            simulate_latency(conn, HEAVY_STEP_SECONDS)  # carrier API: print the label
            return label

        return step

    labels = hold_sync(db_engine, [book(o, c) for o, c in zip(orders, CARRIERS, strict=True)])
    assert len(set(labels)) == len(CARRIERS)
    with db_engine.connect() as conn:
        carriers = (
            conn.execute(
                text("SELECT carrier FROM shipments WHERE order_id = ANY(:o) ORDER BY carrier"),
                {"o": orders},
            )
            .scalars()
            .all()
        )
    assert carriers == sorted(CARRIERS)


def test_backorder_release(db_engine: Engine) -> None:
    warehouse = unique("wh")
    skus = [unique(f"bo{n}") for n in range(BACKORDERS)]
    with db_engine.begin() as conn:
        orders = [_order(conn, {sku: 2}, status="backordered") for sku in skus]

    def release(order: str, sku: str) -> Callable[[Connection], str]:
        def step(conn: Connection) -> str:
            simulate_latency(conn, HEAVY_STEP_SECONDS)  # goods-in: check the delivery
            stock(conn, warehouse, sku, 2)
            status = conn.execute(
                text("UPDATE orders SET status = 'released' WHERE id = :o RETURNING status"),
                {"o": order},
            ).scalar_one()
            simulate_latency(conn, HEAVY_STEP_SECONDS)  # notify the customer
            return str(status)

        return step

    statuses = hold_sync(db_engine, [release(o, s) for o, s in zip(orders, skus, strict=True)])
    assert statuses == ["released"] * BACKORDERS


@pytest.mark.parametrize("lines", range(1, 13))
def test_packing_slip_lists_every_line(db_engine: Engine, lines: int) -> None:
    with db_engine.connect() as conn, conn.begin() as tx:
        order = _order(conn, {f"sku_{n:02d}": n + 1 for n in range(lines)})
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        slip = conn.execute(
            text(
                "SELECT string_agg(sku || ' x' || qty, ', ' ORDER BY sku) "
                "FROM order_lines WHERE order_id = :o"
            ),
            {"o": order},
        ).scalar_one()
        tx.rollback()
    assert slip == ", ".join(f"sku_{n:02d} x{n + 1}" for n in range(lines))
