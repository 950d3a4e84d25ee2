"""What the server allows a login, read on the plugin's own connection against a real
server: the SQL (``server.sql``), the connection and discovery."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

from pytest_poolaware.server.connection import APPLICATION_NAME, target_database
from pytest_poolaware.server.discovery import discover, read_facts
from pytest_poolaware.server.room import ROLE, SERVER, recount, room_of
from pytest_poolaware.server.sql import OTHER_CLIENTS, RUN_CLIENTS
from pytest_poolaware.shared.dsn import with_credentials

ROLE_LIMIT = 16


@contextlib.contextmanager
def connections(dsn: str, count: int) -> Iterator[list[psycopg.Connection[Any]]]:
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(count)]
    try:
        yield conns
    finally:
        for conn in conns:
            conn.close()


def plugin_connections(postgres_dsn: str) -> int:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (APPLICATION_NAME,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_discovery_reads_a_role_limit_and_what_others_hold(limited_role: Any) -> None:
    dsn = limited_role(ROLE_LIMIT)
    with connections(dsn, 3):
        found = discover(dsn, None)
    try:
        assert found.connection is not None
        assert found.facts is not None
        assert not found.facts.superuser
        assert found.choice is not None
        assert found.choice.budget == ROLE_LIMIT - 3 - 1
        role = psycopg.conninfo.conninfo_to_dict(dsn)["user"]
        assert found.choice.source == (
            f"role {role} CONNECTION LIMIT {ROLE_LIMIT}, 3 held by other clients, "
            "1 kept for the monitor"
        )
    finally:
        found.connection.close()


def test_a_plain_login_reads_another_login_s_limits_on_its_own_connection(
    limited_role: Any,
) -> None:
    """What the server allows another login of the run's tests, read without any right
    beyond logging in, on the plugin's connection: its role's limit, its clients."""
    first = limited_role(-1)
    second = limited_role(8)
    role = str(psycopg.conninfo.conninfo_to_dict(second)["user"])
    database = target_database(second)
    found = discover(first, None)
    assert found.connection is not None
    try:
        with connections(second, 3) as held:
            read = read_facts(found.connection, database, role=role)
            ours = [held[0].info.backend_pid]
        assert (read.role, read.role_limit, read.superuser) == (role, 8, False)
        assert not read.own_in_role
        assert read.others_role == 3
        room = room_of(recount(read, ours))
        # 8 - 2 other clients: the plugin's connection is another role's.
        assert (room.budget, room.scope, room.own) == (6, ROLE, 0)
    finally:
        found.connection.close()


def test_discovery_counts_other_roles_it_cannot_fully_see(
    postgres_dsn: str, limited_role: Any
) -> None:
    """A plain role sees other roles' rows without their backend type: still counted."""
    mine = limited_role(-1)  # no role limit: max_connections binds
    other = limited_role(-1)
    before = discover(mine, None)
    with connections(other, 4):
        after = discover(mine, None)
    for found in (before, after):
        assert found.connection is not None
        found.connection.close()
    assert before.facts is not None
    assert after.facts is not None
    assert after.facts.others_server - before.facts.others_server >= 4
    assert after.facts.hidden >= 4
    assert before.room is not None
    assert after.room is not None
    assert after.room.scope == SERVER
    assert before.room.budget - after.room.budget >= 4


def test_discovery_exempts_a_superuser_from_its_role_limit(postgres_dsn: str) -> None:
    role = f"poolaware_su_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER CONNECTION LIMIT 2").format(
                sql.Identifier(role)
            )
        )
    try:
        found = discover(with_credentials(postgres_dsn, role, None), None)
        assert found.connection is not None
        found.connection.close()
        assert found.facts is not None
        assert found.facts.superuser
        assert found.room is not None
        assert found.room.scope == SERVER
        assert found.room.allows == found.facts.max_connections
        assert found.room.budget > 2
    finally:
        import poolaware_testserver as testserver

        testserver.drop_role(postgres_dsn, role)


def test_discovery_reads_a_database_limit(postgres_dsn: str, limited_role: Any) -> None:
    database = f"poolaware_db_{uuid.uuid4().hex[:8]}"
    role_dsn = limited_role(-1)
    role = str(psycopg.conninfo.conninfo_to_dict(role_dsn)["user"])
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} CONNECTION LIMIT 4").format(sql.Identifier(database))
        )
        conn.execute(
            sql.SQL("GRANT ALL ON DATABASE {} TO {}").format(
                sql.Identifier(database), sql.Identifier(role)
            )
        )
    dsn = role_dsn.rsplit("/", 1)[0] + "/" + database
    try:
        with connections(dsn, 1):
            found = discover(dsn, None)
        assert found.connection is not None
        # The plugin's connection is in the maintenance database: not counted there.
        assert found.connection.info.dbname == "postgres"
        found.connection.close()
        assert found.choice is not None
        assert found.choice.budget == 3
        assert found.choice.source == (
            f"database {database} CONNECTION LIMIT 4, 1 held by other clients"
        )
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(database)))


def test_a_server_with_no_room_frees_the_plugin_slot(postgres_dsn: str, limited_role: Any) -> None:
    dsn = limited_role(3)
    before = plugin_connections(postgres_dsn)
    with connections(dsn, 2):
        found = discover(dsn, (5, "--pool-budget"))
        assert found.connection is None
        assert plugin_connections(postgres_dsn) == before
    assert found.choice is not None
    assert (found.choice.budget, found.choice.no_room) == (1, True)
    assert any("no room left for this login" in note for note in found.notes)


def test_a_login_with_every_slot_taken_is_held_to_one_connection(limited_role: Any) -> None:
    dsn = limited_role(2)
    with connections(dsn, 2):
        found = discover(dsn, None)
    assert found.connection is None
    assert found.choice is not None
    assert (found.choice.budget, found.choice.no_room) == (1, True)
    (note,) = found.notes
    assert "no room left for this login" in note
    assert "too many connections for role" in note


def test_an_unreachable_server_is_a_note_without_the_password() -> None:
    found = discover("postgresql://nobody:s3cret@127.0.0.1:1/nowhere", None, "$POOLAWARE_DSN")
    assert found.connection is None
    assert found.choice is None
    (note,) = found.notes
    assert "postgresql://nobody:***@127.0.0.1:1/nowhere" in note
    assert "s3cret" not in note
    assert "the budget was not checked against the server" in note


def count_of(conn: psycopg.Connection[Any], clients: str, role: str) -> int:
    row = conn.execute(
        f"SELECT count(*) FROM pg_stat_activity WHERE {clients} AND usename = %s", (role,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_another_role_s_hidden_rows_are_clients_only_on_the_safe_side(
    limited_role: Any,
) -> None:
    """A plain login sees another role's connections without their backend type: the
    count of other clients takes them for clients (the room errs low), the count of the
    run's own backends only takes what it can tell is one (the monitor's)."""
    mine, other = limited_role(-1), limited_role(-1)
    role = str(psycopg.conninfo.conninfo_to_dict(other)["user"])
    with psycopg.connect(mine, autocommit=True) as conn, connections(other, 3):
        assert count_of(conn, OTHER_CLIENTS, role) == 3
        assert count_of(conn, RUN_CLIENTS, role) == 0
    # A login sees its own role's rows in full: there the two counts agree.
    with psycopg.connect(other, autocommit=True) as own, connections(other, 2):
        assert count_of(own, RUN_CLIENTS, role) == count_of(own, OTHER_CLIENTS, role) == 2
