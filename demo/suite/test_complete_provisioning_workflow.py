"""End-to-end provisioning across RADIUS + NetBox + WireGuard: heavy, sync, serial_only.

The workflow engine runs each subscriber's steps on its own thread and session, so one
test holds a connection per subscriber for the length of the workflow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import pytest
from sqlalchemy import Connection, Engine, text
from support import HEAVY_STEP_SECONDS, hold_sync, ipv4, ipv6, simulate_latency, unique

#: Subscribers pushed through the workflow at once, one thread and connection each.
WORKFLOW_WIDTH: Final = 8


def _workflow(tenant: str, index: int, *, with_wireguard: bool) -> Callable[[Connection], str]:
    def step(conn: Connection) -> str:
        sub_id = unique(f"{tenant}_wf{index}")
        v4, v6 = ipv4(index), ipv6(index)
        conn.execute(
            text(
                "INSERT INTO subscribers (id, tenant, ipv4, ipv6, radius_profile) "
                "VALUES (:id, :t, :v4, :v6, 'workflow')"
            ),
            {"id": sub_id, "t": tenant, "v4": v4, "v6": v6},
        )
        simulate_latency(conn, HEAVY_STEP_SECONDS)  # RADIUS round trip
        conn.execute(
            text(
                "INSERT INTO radius_accounts (username, subscriber_id, framed_ipv4) "
                "VALUES (:id, :id, :v4)"
            ),
            {"id": sub_id, "v4": v4},
        )
        conn.execute(
            text("INSERT INTO netbox_ips (address, subscriber_id) VALUES (:a, :id), (:b, :id)"),
            {"a": v4, "b": v6, "id": sub_id},
        )
        simulate_latency(conn, HEAVY_STEP_SECONDS)  # NetBox IPAM allocation
        if with_wireguard:
            conn.execute(
                text(
                    "INSERT INTO wireguard_peers (public_key, subscriber_id, allowed_ips) "
                    "VALUES (:k, :id, ARRAY[CAST(:a AS cidr), CAST(:b AS cidr)])"
                ),
                {"k": unique("wgkey"), "id": sub_id, "a": f"{v4}/32", "b": f"{v6}/128"},
            )
        conn.execute(
            text("UPDATE subscribers SET status = 'active' WHERE id = :id"), {"id": sub_id}
        )
        return sub_id

    return step


def _run(engine: Engine, *, with_wireguard: bool) -> tuple[str, list[str]]:
    tenant = unique("tenant")
    steps = [_workflow(tenant, i, with_wireguard=with_wireguard) for i in range(WORKFLOW_WIDTH)]
    return tenant, hold_sync(engine, steps)


@pytest.mark.integration
@pytest.mark.serial_only
class TestCompleteProvisioningWorkflow:
    def test_all_subscribers_become_active(self, db_engine: Engine) -> None:
        tenant, ids = _run(db_engine, with_wireguard=False)
        with db_engine.connect() as conn:
            statuses = (
                conn.execute(
                    text("SELECT DISTINCT status FROM subscribers WHERE tenant = :t"), {"t": tenant}
                )
                .scalars()
                .all()
            )
        assert len(ids) == WORKFLOW_WIDTH
        assert statuses == ["active"]

    def test_netbox_holds_both_families(self, db_engine: Engine) -> None:
        _, ids = _run(db_engine, with_wireguard=False)
        with db_engine.connect() as conn:
            families = conn.execute(
                text(
                    "SELECT family(address), count(*) FROM netbox_ips "
                    "WHERE subscriber_id = ANY(:ids) GROUP BY 1 ORDER BY 1"
                ),
                {"ids": ids},
            ).all()
        assert [tuple(r) for r in families] == [(4, WORKFLOW_WIDTH), (6, WORKFLOW_WIDTH)]

    def test_wireguard_peers_get_dual_stack_allowed_ips(self, db_engine: Engine) -> None:
        _, ids = _run(db_engine, with_wireguard=True)
        with db_engine.connect() as conn:
            sizes = (
                conn.execute(
                    text(
                        "SELECT array_length(allowed_ips, 1) FROM wireguard_peers "
                        "WHERE subscriber_id = ANY(:ids)"
                    ),
                    {"ids": ids},
                )
                .scalars()
                .all()
            )
        assert sizes == [2] * WORKFLOW_WIDTH
