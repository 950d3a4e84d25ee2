"""Shared fixtures: one real PostgreSQL per test session, and roles with connection limits.

Set ``POOLAWARE_DSN`` (or run ``python -m pytest_poolaware.pgserver -- pytest ...``) to reuse one
server instead of starting one per session (under xdist, one per worker).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings
from inner import ROLE_LIMIT

from pytest_poolaware import pgserver

# The core's property tests: each simulates whole runs, so fewer examples than
# hypothesis's default by default; "deep" for a long look after changing the core.
settings.register_profile("default", max_examples=80)
settings.register_profile("deep", max_examples=2000)
settings.load_profile("default")


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """Superuser DSN: ``POOLAWARE_DSN`` when set, else a throwaway server for the session."""
    with pgserver.postgres_dsn() as dsn:
        yield dsn


@pytest.fixture
def role_limit() -> int:
    """The connection limit of the role end-to-end suites run as (parametrize to change)."""
    return ROLE_LIMIT


@pytest.fixture
def limited_role(postgres_dsn: str) -> Iterator[Callable[[int], str]]:
    """Factory ``(connection_limit) -> DSN`` of a fresh role; the roles are dropped afterwards."""
    created: list[str] = []

    def make(connection_limit: int) -> str:
        role = f"poolaware_test_{uuid.uuid4().hex[:12]}"
        created.append(role)
        return pgserver.create_role(postgres_dsn, role, connection_limit=connection_limit)

    yield make
    for role in created:
        pgserver.drop_role(postgres_dsn, role)
