"""The room the server's limits leave a login, and the budget chosen from it: arithmetic
only, checked without a server."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from test_layout import PACKAGE, import_graph, module_name, third_party_imports

import pytest_poolaware
from pytest_poolaware.server.room import (
    DATABASE,
    ROLE,
    SERVER,
    Room,
    ServerFacts,
    choose_budget,
    count_clients,
    recount,
    room_of,
)

ROOT = Path(pytest_poolaware.__file__).parent
#: What a pure module must never reach, however indirectly: a database driver.
DRIVERS = frozenset({"psycopg", "psycopg2", "asyncpg", "sqlalchemy"})
ROOM = "server.room"


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


def drivers_reached(module: str, root: Path = ROOT) -> dict[str, set[str]]:
    """The drivers ``module`` imports, itself or through the package's modules it imports
    (at the top, in a function or for type checking), by the module that imports them."""
    graph = import_graph(root)
    paths = {module_name(root, path): path for path in root.rglob("*.py")}
    found: dict[str, set[str]] = {}
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if drivers := third_party_imports(paths[current]) & DRIVERS:
            found[current] = drivers
        todo.extend(graph[current])
    return found


def test_the_room_imports_no_driver() -> None:
    """The arithmetic needs no server: room.py reaches no driver, directly or through
    any module of the package it imports, and imports nothing beyond the standard
    library itself."""
    assert drivers_reached(ROOM) == {}
    assert third_party_imports(ROOT / "server" / "room.py") <= sys.stdlib_module_names


def test_a_driver_imported_by_the_room_is_caught(tmp_path: Path) -> None:
    copy = tmp_path / PACKAGE
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    room = copy / "server" / "room.py"
    room.write_text(
        room.read_text() + "\n\ndef _late() -> None:\n    from pytest_poolaware.server import sql\n"
    )
    sql = copy / "server" / "sql.py"
    sql.write_text(sql.read_text() + "\n\ndef _late() -> None:\n    import psycopg\n")
    assert drivers_reached(ROOM, copy) == {"server.sql": {"psycopg"}}
