"""Frontend/backend smoke tests: light (one connection per request), parallel_safe."""

from __future__ import annotations

from typing import Final

import pytest
from sqlalchemy import Engine, text
from support import LIGHT_STEP_SECONDS, simulate_latency, unique

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]

PAGES: Final = (
    "/",
    "/login",
    "/logout",
    "/dashboard",
    "/customers",
    "/customers/new",
    "/subscribers",
    "/subscribers/new",
    "/billing",
    "/billing/invoices",
    "/network/radius",
    "/network/ipam",
    "/network/wireguard",
    "/tickets",
    "/tickets/new",
    "/reports",
    "/settings",
    "/settings/users",
    "/settings/tenants",
    "/health",
    "/api/docs",
    "/api/v1/ping",
    "/api/v1/customers",
    "/api/v1/subscribers",
    "/api/v1/invoices",
)


@pytest.mark.parametrize("page", PAGES)
def test_page_renders(db_engine: Engine, page: str) -> None:
    with db_engine.connect() as conn:
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        assert conn.execute(text("SELECT length(:p)"), {"p": page}).scalar_one() == len(page)


@pytest.mark.parametrize("page", PAGES)
def test_form_roundtrip(db_engine: Engine, page: str) -> None:
    customer = unique("smoke")
    with db_engine.connect() as conn, conn.begin() as tx:
        conn.execute(
            text("INSERT INTO customers (id, name) VALUES (:id, :n)"), {"id": customer, "n": page}
        )
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        name = conn.execute(
            text("SELECT name FROM customers WHERE id = :id"), {"id": customer}
        ).scalar_one()
        tx.rollback()
    assert name == page
