"""Customer/contact relationship tests: light, async (one connection), parallel_safe."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from support import LIGHT_STEP_SECONDS, RunAsync, simulate_latency_async, unique

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]


async def _customer_with_contacts(engine: AsyncEngine, contacts: int) -> list[tuple[str, bool]]:
    customer = unique("cust")
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO customers (id, name) VALUES (:id, 'ACME')"), {"id": customer}
        )
        for n in range(contacts):
            await conn.execute(
                text(
                    "INSERT INTO contacts (id, customer_id, email, is_primary) "
                    "VALUES (:id, :c, :e, :p)"
                ),
                {"id": unique("contact"), "c": customer, "e": f"c{n}@example.com", "p": n == 0},
            )
        await simulate_latency_async(conn, LIGHT_STEP_SECONDS)
        rows = await conn.execute(
            text("SELECT email, is_primary FROM contacts WHERE customer_id = :c ORDER BY email"),
            {"c": customer},
        )
        return [(r[0], r[1]) for r in rows]


@pytest.mark.parametrize("contacts", range(1, 21))
def test_contacts_belong_to_customer(
    async_engine: AsyncEngine, run_async: RunAsync, contacts: int
) -> None:
    rows = run_async(_customer_with_contacts(async_engine, contacts))
    assert len(rows) == contacts


@pytest.mark.parametrize("contacts", range(1, 21))
def test_exactly_one_primary_contact(
    async_engine: AsyncEngine, run_async: RunAsync, contacts: int
) -> None:
    rows = run_async(_customer_with_contacts(async_engine, contacts))
    assert [email for email, primary in rows if primary] == ["c0@example.com"]
