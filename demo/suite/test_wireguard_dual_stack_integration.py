"""WireGuard dual-stack peers: heavy, async, serial_only (the write-up's fourth class).

Peers are pushed concurrently, one connection each, with a handshake wait per peer.
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

#: Peers configured at once, one connection each.
PEERS: Final = 6


def _peer(tenant: str, index: int) -> Callable[[AsyncConnection], Awaitable[str]]:
    async def step(conn: AsyncConnection) -> str:
        sub_id = unique(f"{tenant}_wg{index}")
        v4, v6 = ipv4(index), ipv6(index)
        await conn.execute(
            text("INSERT INTO subscribers (id, tenant, ipv4, ipv6) VALUES (:id, :t, :a, :b)"),
            {"id": sub_id, "t": tenant, "a": v4, "b": v6},
        )
        await conn.execute(
            text(
                "INSERT INTO wireguard_peers (public_key, subscriber_id, allowed_ips) "
                "VALUES (:k, :id, ARRAY[CAST(:a AS cidr), CAST(:b AS cidr)])"
            ),
            {"k": unique("wgkey"), "id": sub_id, "a": f"{v4}/32", "b": f"{v6}/128"},
        )
        await simulate_latency_async(conn, HEAVY_STEP_SECONDS)  # handshake
        await simulate_latency_async(conn, HEAVY_STEP_SECONDS)  # keepalive confirmed
        return sub_id

    return step


def _push_peers(engine: AsyncEngine, run_async: RunAsync) -> list[str]:
    tenant = unique("tenant")
    ids: list[str] = run_async(hold_async(engine, [_peer(tenant, i) for i in range(PEERS)]))
    return ids


@pytest.mark.integration
@pytest.mark.serial_only
class TestWireGuardDualStackIntegration:
    def test_every_peer_is_registered(self, async_engine: AsyncEngine, run_async: RunAsync) -> None:
        ids = _push_peers(async_engine, run_async)

        async def count() -> int:
            async with async_engine.connect() as conn:
                value = await conn.scalar(
                    text("SELECT count(*) FROM wireguard_peers WHERE subscriber_id = ANY(:i)"),
                    {"i": ids},
                )
                return int(value or 0)

        assert run_async(count()) == PEERS

    def test_allowed_ips_are_host_routes(
        self, async_engine: AsyncEngine, run_async: RunAsync
    ) -> None:
        ids = _push_peers(async_engine, run_async)

        async def masks() -> set[int]:
            async with async_engine.connect() as conn:
                rows = await conn.execute(
                    text(
                        "SELECT DISTINCT masklen(unnest(allowed_ips)) FROM wireguard_peers "
                        "WHERE subscriber_id = ANY(:i)"
                    ),
                    {"i": ids},
                )
                return {r[0] for r in rows}

        assert run_async(masks()) == {32, 128}

    def test_peer_keys_are_unique(self, async_engine: AsyncEngine, run_async: RunAsync) -> None:
        ids = _push_peers(async_engine, run_async)

        async def keys() -> tuple[int, int]:
            async with async_engine.connect() as conn:
                row = (
                    await conn.execute(
                        text(
                            "SELECT count(*), count(DISTINCT public_key) FROM wireguard_peers "
                            "WHERE subscriber_id = ANY(:i)"
                        ),
                        {"i": ids},
                    )
                ).one()
                return int(row[0]), int(row[1])

        assert run_async(keys()) == (PEERS, PEERS)
