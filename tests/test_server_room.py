"""The budget the server sets: its limits read on the plugin's own connection."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from inner import TWO_TESTS, connection_errors, free_port, run, wait_listening
from psycopg import sql
from test_scheduling import CONFTEST, SUITE

from pytest_poolaware.server.room import (
    APPLICATION_NAME,
    DATABASE,
    ROLE,
    SERVER,
    Room,
    ServerFacts,
    choose_budget,
    count_clients,
    discover,
    read_facts,
    recount,
    room_of,
    target_database,
)
from pytest_poolaware.shared.dsn import with_credentials
from pytest_poolaware.worker.agent import RERUN_SERVER

ROLE_LIMIT = 16
#: Tests in test_scheduling.SUITE.
SUITE_TESTS = 39


def facts(**changes: Any) -> ServerFacts:
    base: dict[str, Any] = {
        "version": 150000,
        "max_connections": 100,
        "superuser_reserved": 3,
        "reserved": 0,
        "role": "acc_app",
        "superuser": False,
        "uses_reserved": False,
        "role_limit": -1,
        "database": "app",
        "database_limit": -1,
        "others_server": 0,
        "others_role": 0,
        "others_database": 0,
    }
    return ServerFacts(**{**base, **changes})


# -- the pure part ----------------------------------------------------------------------------


def test_a_role_limit_binds_and_names_itself() -> None:
    room = room_of(facts(role_limit=16))
    assert (room.budget, room.allows, room.scope) == (15, 16, ROLE)
    assert room.describe() == "role acc_app CONNECTION LIMIT 16, 1 kept for the monitor"


def test_other_clients_take_their_share_of_the_tightest_limit() -> None:
    room = room_of(facts(role_limit=16, others_role=4, others_server=90))
    # The server: 100 - 3 reserved - 90 others - 1 own = 6; the role: 11.
    assert (room.budget, room.scope, room.others) == (6, SERVER, 90)
    assert room.describe() == (
        "max_connections 100 less 3 reserved, 90 held by other clients, 1 kept for the monitor"
    )


def test_superusers_are_exempt_from_role_and_database_limits() -> None:
    room = room_of(facts(superuser=True, role_limit=2, database_limit=2, others_server=10))
    # Nor do the reserved slots hold them back.
    assert (room.budget, room.scope, room.allows) == (89, SERVER, 100)


def test_reserved_connections_apply_to_roles_without_the_right_to_use_them() -> None:
    plain = room_of(facts(version=160000, reserved=5))
    privileged = room_of(facts(version=160000, reserved=5, uses_reserved=True))
    assert (plain.budget, plain.allows) == (91, 92)
    assert (privileged.budget, privileged.allows) == (96, 97)


def test_a_database_limit_does_not_count_the_plugin_connection_made_elsewhere() -> None:
    elsewhere = room_of(facts(database_limit=6, others_database=1, own_in_database=False))
    inside = room_of(facts(database_limit=6, others_database=1))
    assert (elsewhere.budget, elsewhere.scope, elsewhere.own) == (5, DATABASE, 0)
    assert elsewhere.describe() == "database app CONNECTION LIMIT 6, 1 held by other clients"
    assert inside.budget == 4


def test_another_login_s_role_limit_does_not_count_the_plugin_connection() -> None:
    """The room of another login the run's tests use, read on the plugin's connection
    (which logs in as the first one): that connection takes no slot of its role."""
    room = room_of(facts(role_limit=8, others_role=1, own_in_role=False))
    assert (room.budget, room.scope, room.own) == (7, ROLE, 0)
    assert room.describe() == "role acc_app CONNECTION LIMIT 8, 1 held by other clients"


def test_a_tight_role_leaves_the_tests_every_slot_but_the_plugin_s_own() -> None:
    """A role with CONNECTION LIMIT 3 (a Django project's, say): no slot is kept for
    closes, since the workers count a closed connection until its backend has exited;
    the plugin's connection takes one only when it logs in as that role."""
    same = room_of(facts(role_limit=3))
    other = room_of(facts(role_limit=3, own_in_role=False))
    assert (same.budget, same.own, same.scope) == (2, 1, ROLE)
    assert same.describe() == "role acc_app CONNECTION LIMIT 3, 1 kept for the monitor"
    assert (other.budget, other.own, other.scope) == (3, 0, ROLE)
    assert other.describe() == "role acc_app CONNECTION LIMIT 3"


#: Client backends: (pid, role, database, backend type hidden).
CLIENTS = (
    (11, "acc_app", "app", False),
    (12, "acc_app", "other", False),
    (13, "admin", "app", False),
    (14, "someone", "app", True),
)


def test_other_clients_are_counted_by_scope_without_the_run_s_own() -> None:
    assert count_clients(CLIENTS, "acc_app", "app") == (4, 2, 3, 1)
    assert count_clients(CLIENTS, "acc_app", "app", runs=[11, 14, 99]) == (2, 1, 1, 0)
    assert count_clients((), "acc_app", "app") == (0, 0, 0, 0)


def test_recounting_drops_the_backends_learned_to_be_the_run_s() -> None:
    read = facts(role_limit=8, clients=CLIENTS, others_server=4, others_role=2)
    again = recount(read, runs=[11, 12])
    assert (again.others_server, again.others_role, again.others_database) == (2, 0, 2)
    assert room_of(again).budget == room_of(read).budget + 2


def test_the_smaller_of_the_configured_budget_and_the_room_wins() -> None:
    room = room_of(facts(role_limit=16))
    assert choose_budget(None, room).budget == 15
    smaller = choose_budget((10, "--pool-budget"), room)
    assert (smaller.budget, smaller.source, smaller.warning) == (10, "--pool-budget", None)
    larger = choose_budget((30, "PG_POOL_SIZE + PG_MAX_OVERFLOW = 10 + 20"), room)
    assert larger.budget == 15
    assert (
        larger.source == "role acc_app CONNECTION LIMIT 16, 1 kept for the monitor; configured 30"
    )
    assert larger.warning is not None
    assert "configured budget 30 (PG_POOL_SIZE + PG_MAX_OVERFLOW = 10 + 20)" in larger.warning


@pytest.mark.parametrize("budget", [0, -3])
def test_no_room_holds_the_run_to_one_connection(budget: int) -> None:
    choice = choose_budget((5, "--pool-budget"), Room(budget, "role r CONNECTION LIMIT 2", 2, 2, 1))
    assert (choice.budget, choice.no_room) == (1, True)
    assert "no room left for this login" in choice.source


# -- against the real server ------------------------------------------------------------------


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


# -- end to end -------------------------------------------------------------------------------


@pytest.fixture
def unconfigured_suite(
    pytester: pytest.Pytester, limited_role: Any, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The write-up's suite shape against a role limited to 16, with no PG_POOL_* set."""
    role_dsn = limited_role(ROLE_LIMIT)
    monkeypatch.setenv("POOLAWARE_DSN", role_dsn)
    monkeypatch.setenv("POOLAWARE_TEST_LOG", str(pytester.path / "events.jsonl"))
    for name in ("PG_POOL_SIZE", "PG_MAX_OVERFLOW", "PG_POOL_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    return {"dsn": role_dsn, "role": psycopg.conninfo.conninfo_to_dict(role_dsn)["user"]}


def test_with_nothing_configured_the_role_limit_is_the_budget_cold_and_warm(
    pytester: pytest.Pytester, unconfigured_suite: dict[str, str]
) -> None:
    role = unconfigured_suite["role"]
    source = f"role {role} CONNECTION LIMIT {ROLE_LIMIT}, 1 kept for the monitor"
    for first in (True, False):
        args = ["-n", "4", "--dist", "poolaware", "--poolaware-report", "report.json"]
        result = run(pytester, *args, *(["--cache-clear"] if first else []))
        result.assert_outcomes(passed=SUITE_TESTS)
        text = result.stdout.str()
        assert connection_errors(result) == 0
        # A cold run may still make a test give way to break a wait among its own
        # workers; the server itself never refuses one.
        assert RERUN_SERVER not in text
        result.stdout.fnmatch_lines([f"budget: 15 connections ({source})"])
        assert "WARNING" not in text
        report = json.loads((pytester.path / "report.json").read_text())
        assert (report["run"]["budget"], report["run"]["budget_source"]) == (15, source)
        assert not any(test["rerun"] == RERUN_SERVER for test in report["tests"])


def test_a_configured_budget_above_the_room_is_warned_about_once(
    pytester: pytest.Pytester, unconfigured_suite: dict[str, str]
) -> None:
    result = run(pytester, "-n", "2", "--dist", "poolaware", "--pool-budget", "40")
    result.assert_outcomes(passed=SUITE_TESTS)
    assert connection_errors(result) == 0
    warning = (
        "WARNING: the configured budget 40 (--pool-budget) is more than the server allows "
        f"this login (role {unconfigured_suite['role']} CONNECTION LIMIT 16, 1 kept for the "
        "monitor): the run uses 15"
    )
    assert result.stdout.lines.count(warning) == 1


# -- behind a pooler --------------------------------------------------------------------------

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@pytest.fixture
def pgbouncer(postgres_dsn: str, limited_role: Any) -> Iterator[str]:
    """pgbouncer in transaction mode in front of the server; yields a limited role's DSN
    through it."""
    if not os.path.exists(PGBOUNCER):
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    role_dsn = limited_role(ROLE_LIMIT)
    params = psycopg.conninfo.conninfo_to_dict(role_dsn)
    port = free_port()
    # Outside pytest's own temporary directory, which its unprivileged account cannot enter.
    with tempfile.TemporaryDirectory(prefix="poolaware-pgbouncer-") as directory:
        yield from _serve_pgbouncer(Path(directory), params, port)


def _serve_pgbouncer(home: Path, params: dict[str, Any], port: int) -> Iterator[str]:
    home.chmod(0o777)
    (home / "users.txt").write_text(f'"{params["user"]}" ""\n')
    (home / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"postgres = host={params['host']} port={params['port']} dbname=postgres\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {home / 'users.txt'}\npool_mode = transaction\n"
        f"logfile = {home / 'pgbouncer.log'}\n"
    )
    for path in home.iterdir():
        path.chmod(0o666)
    command = [PGBOUNCER, str(home / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command[1:1] = ["-u", "postgres"]  # it will not run as root
    errors = (home / "stderr.txt").open("w")
    process = subprocess.Popen(command, stdout=errors, stderr=errors)
    try:
        try:
            wait_listening(port, process)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{(home / 'stderr.txt').read_text()}") from None
        yield f"postgresql://{params['user']}@127.0.0.1:{port}/postgres"
    finally:
        process.terminate()
        process.wait()
        errors.close()


def test_behind_pgbouncer_the_budget_is_read_and_sharing_is_off_with_a_note(
    pytester: pytest.Pytester, pgbouncer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = discover(pgbouncer, None)
    assert found.connection is not None
    found.connection.close()
    assert found.pooled
    assert found.choice is not None
    assert found.choice.budget == ROLE_LIMIT - 1
    monkeypatch.setenv("POOLAWARE_DSN", pgbouncer)
    pytester.makepyfile(TWO_TESTS)
    result = run(pytester, "-n", "2", "--dist", "poolaware", "--poolaware-share", "auto")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "budget: 15 connections (role * CONNECTION LIMIT 16, 1 kept for the monitor)",
            "note: sharing the server's room with other runs is off: a pooler (pgbouncer) *",
        ]
    )


def inner_suite(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, dsn: str, suite: str
) -> None:
    """An inner suite against ``dsn`` with no pool sizes configured: the server's room
    is the budget."""
    monkeypatch.setenv("POOLAWARE_DSN", dsn)
    monkeypatch.setenv("POOLAWARE_TEST_LOG", os.devnull)
    for name in ("PG_POOL_SIZE", "PG_MAX_OVERFLOW"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=suite)


def test_behind_pgbouncer_a_suite_keeps_its_budget_and_says_what_is_not_counted(
    pytester: pytest.Pytester, pgbouncer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the pooler, the workers' connections are the pooler's clients: the server
    never lists their backends, so the server's list must not uncount them."""
    inner_suite(pytester, monkeypatch, pgbouncer, SUITE)
    result = run(pytester, "-n", "4", "--dist", "poolaware")
    result.assert_outcomes(passed=SUITE_TESTS)
    assert connection_errors(result) == 0
    assert RERUN_SERVER not in result.stdout.str()
    # The plugin's own queries get through the pooler all run long.
    assert "server monitoring stopped" not in result.stdout.str()
    text = result.stdout.str()
    budget = re.search(r"^budget: (\d+) connections", text, re.MULTILINE)
    peak = re.search(r"^peak open connections \(workers\): (\d+)", text, re.MULTILINE)
    assert budget, text
    assert peak, text
    # The suite asks for more than the budget at once, so the peak reaches into it, and
    # the workers' own count (the pooler's clients) stays within it.
    assert 8 <= int(peak[1]) <= int(budget[1])
    result.stdout.fnmatch_lines(
        ["note: a pooler (pgbouncer) stands between the plugin and the server: *"]
    )


TOO_BIG = """
import pytest
from conftest import hold

def test_too_big(engine):
    hold(engine, 8, 0.1)

@pytest.mark.parametrize("n", range(6))
def test_small(engine, n):
    hold(engine, 2, 0.05)
"""


def test_a_test_needing_more_than_the_server_allows_fails_with_a_clear_message(
    pytester: pytest.Pytester, limited_role: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    role_dsn = limited_role(6)
    role = psycopg.conninfo.conninfo_to_dict(role_dsn)["user"]
    inner_suite(pytester, monkeypatch, role_dsn, TOO_BIG)
    result = run(pytester, "-n", "2", "--dist", "poolaware", "-rA")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*RoomTooSmall: pytest-poolaware: this test needs 6 connections at once; the server "
            f"allows this login 6 (role {role} CONNECTION LIMIT 6), 5 of them for the run's tests"
        ]
    )
    # Not rerun for being too big: a rerun would be refused the same. (It may have given
    # way once to break a wait with a small test, before it reached the room, and then
    # run alone: that rerun is the only one allowed.)
    reruns = [line for line in result.stdout.lines if line.startswith("rerun alone")]
    for line in reruns:
        if "test_suite.py::test_too_big" in line:
            assert line.startswith("rerun alone (gave way to break a wait"), line
