"""Shared fixtures: one real PostgreSQL per test session, and roles with connection limits.

Set ``POOLAWARE_DSN`` (or run ``python -m poolaware_testserver -- pytest ...``) to reuse one
server instead of starting one per session (under xdist, one per worker).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings
from inner import ROLE_LIMIT, ROLE_PASSWORD

# The core's property tests: each simulates whole runs, so fewer examples than
# hypothesis's default by default; "deep" for a long look after changing the core.
settings.register_profile("default", max_examples=80)
settings.register_profile("deep", max_examples=2000)
settings.load_profile("default")


@pytest.fixture(scope="session", autouse=True)
def inner_runs_keep_their_own_cache() -> Iterator[None]:
    """Under tox, pytest puts every run's cache in ``$TOX_ENV_DIR/.pytest_cache``: inner
    runs started without pytester (which drops the variable itself) would then share one
    cache, and what one learned would leak into the next. Each keeps its own, as a user's
    checkout does."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TOX_ENV_DIR", raising=False)
        yield


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """Superuser DSN: ``POOLAWARE_DSN`` when set, else a throwaway server for the session.

    When no server can be had the run stops with what to install or set, not a traceback
    in every test that needs one. (Imported here: ``tox -e package`` runs without it.)
    """
    import poolaware_testserver as testserver

    try:
        with testserver.postgres_dsn() as dsn:
            yield dsn
    except testserver.ServerUnavailable as exc:
        pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture
def role_limit() -> int:
    """The connection limit of the role end-to-end suites run as (parametrize to change)."""
    return ROLE_LIMIT


@pytest.fixture
def limited_role(postgres_dsn: str) -> Iterator[Callable[[int], str]]:
    """Factory ``(connection_limit) -> DSN`` of a fresh role; the roles are dropped afterwards."""
    import poolaware_testserver as testserver

    created: list[str] = []

    def make(connection_limit: int) -> str:
        role = f"poolaware_test_{uuid.uuid4().hex[:12]}"
        created.append(role)
        return testserver.create_role(postgres_dsn, role, connection_limit=connection_limit)

    yield make
    for role in created:
        testserver.drop_role(postgres_dsn, role)


@pytest.fixture
def secret_role(postgres_dsn: str) -> Iterator[tuple[str, str]]:
    """A role limited to ROLE_LIMIT connections, with a password: (DSN, name)."""
    import poolaware_testserver as testserver

    role = f"poolaware_test_{uuid.uuid4().hex[:12]}"
    dsn = testserver.create_role(
        postgres_dsn, role, connection_limit=ROLE_LIMIT, password=ROLE_PASSWORD
    )
    yield dsn, role
    testserver.drop_role(postgres_dsn, role)
