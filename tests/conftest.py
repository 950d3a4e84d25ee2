"""Shared fixtures: one real PostgreSQL per test session, and roles with connection limits;
and each test's tier (tests/tiers.py), held while it runs.

Set ``POOLAWARE_DSN`` (or run ``python -m poolaware_testserver -- pytest ...``) to reuse one
server instead of starting one per session (under xdist, one per worker). ``pytest -m
unit`` runs the pure tests alone (no server is started), ``-m db`` those on a real server,
``-m e2e`` the whole runs.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings
from inner import ROLE_LIMIT, ROLE_PASSWORD
from tiers import COLLECTED_TIERS, GUARD, TierError, TierGuard, marked_tiers, tier_of

# The core's property tests: each simulates whole runs, so fewer examples than
# hypothesis's default by default; "deep" for a long look after changing the core.
settings.register_profile("default", max_examples=80)
settings.register_profile("deep", max_examples=2000)
settings.load_profile("default")


def pytest_configure(config: pytest.Config) -> None:
    """An audit hook sees every process start, however a test or a library makes it."""
    guard = config.stash[GUARD] = TierGuard()
    sys.addaudithook(guard.audit)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test gets its tier marker, before ``-m`` selects by it."""
    problems = []
    for item in items:
        declared = marked_tiers(item)
        try:
            tier = tier_of(item.nodeid, getattr(item, "fixturenames", ()), declared)
        except TierError as exc:
            problems.append(str(exc))
            continue
        if not declared:
            item.add_marker(tier)
    if problems:
        raise pytest.UsageError("\n".join(problems))
    config.stash[COLLECTED_TIERS] = {item.nodeid: sorted(marked_tiers(item)) for item in items}


def tier_marked(item: pytest.Item) -> str:
    (tier,) = marked_tiers(item)
    return tier


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """The guard watches the test's setup and call."""
    guard = item.config.stash[GUARD]
    guard.enter(item.nodeid, tier_marked(item))
    try:
        return (yield)
    finally:
        guard.leave()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """A test that did what its tier rules out errors, even if its code caught the refusal.

    Teardown is not watched: it also ends the broader fixtures (the session's server) that
    earlier tests of any tier set up."""
    broken = item.config.stash[GUARD].leave()
    result = yield
    if broken:
        pytest.fail(f"{item.nodeid} broke its tier ({tier_marked(item)}): " + "; ".join(broken))
    return result


#: What pytest-xdist tells its workers: an outer ``-n`` would hand it to the runs a test
#: starts, whose controller would then take itself for a worker.
XDIST_WORKER_VARIABLES = (
    "PYTEST_XDIST_WORKER",
    "PYTEST_XDIST_WORKER_COUNT",
    "PYTEST_XDIST_TESTRUNUID",
)


@pytest.fixture(autouse=True)
def inner_runs_are_not_workers(request: pytest.FixtureRequest) -> Iterator[None]:
    """The runs a test starts (pytester) are controllers, however this suite is run."""
    if "pytester" not in request.fixturenames:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        for name in XDIST_WORKER_VARIABLES:
            patch.delenv(name, raising=False)
        yield


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
def postgres_server() -> Iterator[str]:
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
def server_allowed(request: pytest.FixtureRequest) -> None:
    """Refuses the server to a unit test, before the session's server is set up: pytest
    keeps a session fixture's error for the whole session, so a refusal raised inside
    ``postgres_server`` would fail every later test that needs the server."""
    request.config.stash[GUARD].server_requested("postgres_dsn")


@pytest.fixture
def postgres_dsn(server_allowed: None, postgres_server: str) -> str:
    """The session's superuser DSN (``postgres_server``), asked for per test, so a unit
    test asking for it fails. The server is a parameter, not looked up here: as a
    session fixture it is then set up before ``pytester``, whose snapshot of
    ``sys.modules`` would otherwise drop the modules the server's start imports (psutil
    among them) at the test's end, and the server could not be stopped at the session's."""
    return postgres_server


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
