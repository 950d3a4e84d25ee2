"""Runs of plugin versions that speak different sharing protocols, on one real server:
every lock key carries the protocol's version (``server.share_plan.lock_key``), so a run
never reads another version's locks as leases; it says so once and counts that run's
connections as another client's."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from test_discovery import connections
from test_sharing import ROLE_LIMIT, Coordinated, FakeClock, settle

from pytest_poolaware.server.connection import open_connection
from pytest_poolaware.server.share import share_summary
from pytest_poolaware.server.share_plan import (
    SHARE_PROTOCOL,
    key_parts,
    lock_classes,
    lock_key,
)

#: A protocol this plugin does not speak: a later release's.
OTHER_VERSION = SHARE_PROTOCOL + 1
#: Connections the other version's run holds: its own, and its tests'.
OTHER_TESTS = 3


def test_a_key_carries_the_version_and_the_number() -> None:
    assert key_parts(lock_key(5)) == (SHARE_PROTOCOL, 5)
    assert key_parts(lock_key(0, OTHER_VERSION)) == (OTHER_VERSION, 0)
    assert lock_key(7) != lock_key(7, OTHER_VERSION)
    assert 0 <= lock_key(2**24 - 1, 127) < 2**31  # a non-negative int4, as pg_locks shows it
    with pytest.raises(ValueError, match="out of range"):
        lock_key(2**24)


@pytest.fixture
def run(limited_role: Any) -> Iterator[tuple[Coordinated, str]]:
    dsn = limited_role(ROLE_LIMIT)
    coordinated = Coordinated(dsn, f"test-{uuid.uuid4().hex[:8]}", FakeClock())
    try:
        yield coordinated, dsn
    finally:
        coordinated.share.stop()
        coordinated.connection.close()


def test_a_run_of_another_protocol_version_is_counted_as_a_client(
    run: tuple[Coordinated, str],
) -> None:
    """Another version's run holds slot leases 0-3, demand and the priority in this run's
    name space (the same lock classes, other keys): this run takes its own slots all the
    same, sees no other run, says so once, and leaves room for that run's connections as
    it would for any client's."""
    mine, dsn = run
    slot, demand, priority, tickets = lock_classes(mine.share.namespace, mine.share.room.limit)
    other = open_connection(dsn)
    try:
        for number in range(OTHER_TESTS + 1):
            other.execute(
                "SELECT pg_advisory_lock(%s, %s)", (slot, lock_key(number, OTHER_VERSION))
            )
            other.execute(
                "SELECT pg_advisory_lock_shared(%s, %s)", (demand, lock_key(number, OTHER_VERSION))
            )
        other.execute("SELECT pg_advisory_lock(%s, %s)", (priority, lock_key(0, OTHER_VERSION)))
        other.execute(
            "SELECT pg_advisory_lock_shared(%s, %s)", (tickets, lock_key(7, OTHER_VERSION))
        )
        with connections(dsn, OTHER_TESTS):
            mine.wants(ROLE_LIMIT)
            settle(mine)
            # The limit, less its own connection, one closing, and the other run's 4.
            assert mine.share.budget() == ROLE_LIMIT - 2 - (OTHER_TESTS + 1)
            assert not mine.share.limits().give_way
    finally:
        other.close()
    assert mine.share.peers_seen == 0
    assert share_summary(mine.share) is None  # no run it shared with
    (note,) = mine.share.other_versions.values()
    assert note.startswith(f"another run uses sharing protocol v{OTHER_VERSION}: ")
    assert "this run counts its connections as another client's" in note
