"""Module interface checks: light (one connection, tens of ms), marked parallel_safe."""

from __future__ import annotations

from typing import Final

import pytest
from sqlalchemy import Engine, text
from support import LIGHT_STEP_SECONDS, simulate_latency

pytestmark = [pytest.mark.integration, pytest.mark.parallel_safe]

MODULES: Final = (
    "auth",
    "billing",
    "customers",
    "contacts",
    "radius",
    "netbox",
    "wireguard",
    "ipam",
    "tickets",
    "notifications",
    "audit",
    "tenants",
    "plans",
    "invoices",
    "payments",
    "inventory",
    "onboarding",
    "reports",
    "webhooks",
    "search",
)
INTERFACES: Final = ("models", "repository", "service", "router", "schemas")


@pytest.mark.parametrize("interface", INTERFACES)
@pytest.mark.parametrize("module", MODULES)
def test_interface_resolves(db_engine: Engine, module: str, interface: str) -> None:
    with db_engine.connect() as conn:
        simulate_latency(conn, LIGHT_STEP_SECONDS)
        resolved = conn.execute(
            text("SELECT :m || '.' || :i"), {"m": module, "i": interface}
        ).scalar_one()
    assert resolved == f"{module}.{interface}"
