"""Dual-stack (IPv4 + IPv6) subscriber provisioning: heavy, async, marked serial_only.

Each test provisions a batch of subscribers concurrently, one connection per subscriber
(``asyncio.gather``), the way the provisioning service does it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from support import (
    HEAVY_STEP_SECONDS,
    RunAsync,
    hold_async,
    ipv4,
    ipv6,
    simulate_latency_async,
    unique,
)

#: Subscribers provisioned at once, one connection each.
BATCH: Final = 8


def _provision(
    tenant: str, index: int, profile: str
) -> Callable[[AsyncConnection], Awaitable[str]]:
    async def step(conn: AsyncConnection) -> str:
        sub_id = unique(f"{tenant}_sub{index}")
        await conn.execute(
            text(
                "INSERT INTO subscribers (id, tenant, ipv4, ipv6, radius_profile, status) "
                "VALUES (:id, :t, :v4, :v6, :p, 'active')"
            ),
            {
                "id": sub_id,
                "t": tenant,
                "v4": ipv4(index),
                "v6": ipv6(index),
                "p": profile,
            },
        )
        await simulate_latency_async(conn, HEAVY_STEP_SECONDS)
        await conn.execute(
            text(
                "INSERT INTO radius_accounts (username, subscriber_id, framed_ipv4, "
                "delegated_ipv6) SELECT id, id, ipv4, set_masklen(ipv6, 128)::cidr "
                "FROM subscribers WHERE id = :id"
            ),
            {"id": sub_id},
        )
        return sub_id

    return step


async def _provision_batch(engine: AsyncEngine, profile: str) -> tuple[str, list[str]]:
    tenant = unique("tenant")
    ids = await hold_async(engine, [_provision(tenant, i, profile) for i in range(BATCH)])
    return tenant, ids


@pytest.mark.integration
@pytest.mark.serial_only
class TestDualStackSubscriberProvisioning:
    def test_batch_gets_both_address_families(
        self, async_engine: AsyncEngine, run_async: RunAsync
    ) -> None:
        tenant, ids = run_async(_provision_batch(async_engine, "dual-stack-100M"))

        async def check() -> list[tuple[int, int]]:
            async with async_engine.connect() as conn:
                rows = await conn.execute(
                    text("SELECT family(ipv4), family(ipv6) FROM subscribers WHERE tenant = :t"),
                    {"t": tenant},
                )
                return [(r[0], r[1]) for r in rows]

        assert run_async(check()) == [(4, 6)] * len(ids)

    def test_radius_accounts_follow_subscribers(
        self, async_engine: AsyncEngine, run_async: RunAsync
    ) -> None:
        _, ids = run_async(_provision_batch(async_engine, "dual-stack-1G"))

        async def count() -> int:
            async with async_engine.connect() as conn:
                return int(
                    await conn.scalar(
                        text(
                            "SELECT count(*) FROM radius_accounts WHERE subscriber_id = ANY(:ids)"
                        ),
                        {"ids": ids},
                    )
                    or 0
                )

        assert run_async(count()) == BATCH

    def test_delegated_prefix_is_host_route(
        self, async_engine: AsyncEngine, run_async: RunAsync
    ) -> None:
        _, ids = run_async(_provision_batch(async_engine, "dual-stack-50M"))

        async def masks() -> set[int]:
            async with async_engine.connect() as conn:
                rows = await conn.execute(
                    text(
                        "SELECT masklen(delegated_ipv6) FROM radius_accounts "
                        "WHERE subscriber_id = ANY(:ids)"
                    ),
                    {"ids": ids},
                )
                return {r[0] for r in rows}

        assert run_async(masks()) == {128}

    def test_reprovisioning_is_idempotent(
        self, async_engine: AsyncEngine, run_async: RunAsync
    ) -> None:
        tenant, ids = run_async(_provision_batch(async_engine, "dual-stack-100M"))

        async def reprovision(conn: AsyncConnection) -> int:
            result = await conn.execute(
                text("UPDATE subscribers SET status = 'active' WHERE tenant = :t"), {"t": tenant}
            )
            await simulate_latency_async(conn, HEAVY_STEP_SECONDS)
            return result.rowcount

        assert run_async(hold_async(async_engine, [reprovision])) == [len(ids)]
