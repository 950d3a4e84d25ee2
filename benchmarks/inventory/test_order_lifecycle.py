"""Order lifecycle tests nobody marked: light. Status changes take one connection; a
cancellation takes two at once (the order service cancels while the stock service puts
the lines back on the shelf).
"""

from __future__ import annotations

from typing import Final

import pytest
from sqlalchemy import Connection, Engine, text
from support import LIGHT_STEP_SECONDS, hold_sync, on_hand, simulate_latency, stock, unique

pytestmark = pytest.mark.integration

#: The order workflow: status -> the statuses it may move to.
TRANSITIONS: Final = {
    "placed": ("paid", "cancelled"),
    "paid": ("picking", "cancelled", "refunded"),
    "picking": ("packed", "backordered"),
    "backordered": ("released", "cancelled"),
    "released": ("picking",),
    "packed": ("shipped",),
    "shipped": ("delivered", "returned"),
}
ALLOWED: Final = [(a, b) for a, targets in TRANSITIONS.items() for b in targets]
REJECTED: Final = [
    ("placed", "shipped"), ("paid", "delivered"), ("packed", "placed"),
    ("shipped", "picking"), ("delivered", "paid"), ("cancelled", "paid"),
]  # fmt: skip
#: The transition table as the service stores it (one row per allowed move).
TRANSITION_ROWS: Final = ", ".join(f"('{a}', '{b}')" for a, b in ALLOWED)


def _move(conn: Connection, order: str, target: str) -> bool:
    """Move the order to ``target`` if the workflow allows it; whether it moved."""
    moved = conn.execute(
        text(
            "UPDATE orders SET status = :t WHERE id = :o AND (status, :t) IN "
            f"(SELECT a, b FROM (VALUES {TRANSITION_ROWS}) AS allowed(a, b))"
        ),
        {"o": order, "t": target},
    ).rowcount
    return moved == 1


def _order_in(conn: Connection, status: str) -> str:
    order = unique("ord")
    conn.execute(
        text("INSERT INTO orders (id, customer, status) VALUES (:o, 'acme', :s)"),
        {"o": order, "s": status},
    )
    return order


@pytest.mark.parametrize(("current", "target"), ALLOWED, ids=[f"{a}-{b}" for a, b in ALLOWED])
def test_allowed_transition(db_engine: Engine, current: str, target: str) -> None:
    with db_engine.connect() as conn, conn.begin() as tx:
        order = _order_in(conn, current)
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        moved = _move(conn, order, target)
        tx.rollback()
    assert moved


@pytest.mark.parametrize(("current", "target"), REJECTED, ids=[f"{a}-{b}" for a, b in REJECTED])
def test_illegal_transition_is_rejected(db_engine: Engine, current: str, target: str) -> None:
    with db_engine.connect() as conn, conn.begin() as tx:
        order = _order_in(conn, current)
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        moved = _move(conn, order, target)
        tx.rollback()
    assert not moved


@pytest.mark.parametrize("lines", range(1, 9))
def test_cancellation_restocks_the_lines(db_engine: Engine, lines: int) -> None:
    warehouse = unique("wh")
    quantities = {unique(f"line{n}"): n + 1 for n in range(lines)}
    with db_engine.begin() as conn:
        order = _order_in(conn, "paid")
        for sku in quantities:
            stock(conn, warehouse, sku, 0)

    def cancel(conn: Connection) -> bool:
        simulate_latency(conn, LIGHT_STEP_SECONDS)  # refund request
        return _move(conn, order, "cancelled")

    def restock(conn: Connection) -> bool:
        for sku, qty in quantities.items():
            conn.execute(
                text(
                    "UPDATE stock_levels SET on_hand = on_hand + :q "
                    "WHERE warehouse = :w AND sku = :s"
                ),
                {"q": qty, "w": warehouse, "s": sku},
            )
        simulate_latency(conn, LIGHT_STEP_SECONDS)  # put-away confirmation
        return True

    assert hold_sync(db_engine, [cancel, restock]) == [True, True]
    with db_engine.connect() as conn:
        assert [on_hand(conn, warehouse, sku) for sku in quantities] == list(quantities.values())
