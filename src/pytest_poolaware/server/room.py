"""What the server allows the run's login: its connection limits and who holds them now.

The budget a user types is a guess; the truth lives on the server (``max_connections``,
the reserved slots, a role's or a database's ``CONNECTION LIMIT``, the connections other
clients hold). ``discovery`` reads those facts on the plugin's own connection before any
worker starts; here they are only counted: the room each limit leaves, the tightest of
them, and the budget chosen from it. Pure arithmetic, so it is tested without a server
and imports no driver (``tests/test_room.py`` holds it to that).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Final

#: Why a run is held to one connection at a time.
NO_ROOM: Final = "no room left for this login; one connection at a time"

SERVER: Final = "server"
ROLE: Final = "role"
DATABASE: Final = "database"

#: Words for the plugin's own connection in the budget's source.
OWN_CONNECTION: Final = "1 kept for the monitor"
#: Slots kept free for connections a client has closed and the server still counts for a
#: moment (its backend has yet to exit). Runs sharing a server leave them in their shares
#: (``share``): this run cannot watch another run's closes. The monitor's own connection
#: needs a role limit above the budget and these (``monitor``). The room itself keeps
#: none for the run's own workers: a worker counts a closed connection until its backend
#: has exited (``docs/design.md``, "A close counts once the server has freed the slot").
CLOSING_SLACK: Final = 1


#: A client backend as ``discovery.read_facts`` sees it: (pid, role, database, whether its
#: backend type is hidden from this login).
Client = tuple[int, str, str, bool]


@dataclass(frozen=True)
class ServerFacts:
    """What the server says about one login, read in one go (``discovery.read_facts``)."""

    version: int  # server_version_num
    max_connections: int
    superuser_reserved: int
    #: ``reserved_connections`` (PostgreSQL 16+; 0 before).
    reserved: int
    role: str
    superuser: bool
    #: Whether the role may use the ``reserved_connections`` slots.
    uses_reserved: bool
    role_limit: int  # -1: none
    database: str
    database_limit: int  # -1: none (or the database was not found)
    #: Client backends other than the plugin's own connection: on the whole server, of
    #: this role, in this database.
    others_server: int
    others_role: int
    others_database: int
    #: Rows of other roles whose backend type this login cannot see (counted as clients).
    hidden: int = 0
    #: Whether the plugin's own connection is in ``database`` (it counts in its limit).
    own_in_database: bool = True
    #: Whether the plugin's own connection logs in as ``role`` (it counts in its limit):
    #: not when the facts are those of another login the run's tests use.
    own_in_role: bool = True
    #: The client backends seen, so that the counts can be taken again once more of
    #: the run's own backends are known (``recount``).
    clients: tuple[Client, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Room:
    """The connections the run may open: the tightest of the limits that apply."""

    #: What the run's workers may hold at once: the limit, less what other clients hold,
    #: less the plugin's own connection where it counts. May be 0 or less: no room.
    budget: int
    #: The binding limit, in words ("role acc_app CONNECTION LIMIT 16").
    limit: str
    #: That limit's number: what the server allows this login in all.
    allows: int
    others: int
    own: int  # 1 when the plugin's connection counts against the binding limit
    #: Which limit binds: ``SERVER``, ``ROLE`` or ``DATABASE``.
    scope: str = "server"

    def describe(self) -> str:
        """ "role acc_app CONNECTION LIMIT 16, 1 kept for the monitor"."""
        parts = [self.limit]
        if self.others:
            parts.append(f"{self.others} held by other clients")
        if self.own:
            parts.append(OWN_CONNECTION)
        return ", ".join(parts)


def room_of(facts: ServerFacts) -> Room:
    """The tightest limit for this login: the server's slots, the role's and the
    database's ``CONNECTION LIMIT`` (superusers are exempt from those two)."""
    reserved = facts.superuser_reserved + (0 if facts.uses_reserved else facts.reserved)
    if facts.superuser:
        return Room(
            facts.max_connections - facts.others_server - 1,
            f"max_connections {facts.max_connections}",
            facts.max_connections,
            facts.others_server,
            1,
        )
    words = f"max_connections {facts.max_connections}"
    if reserved:
        words += f" less {reserved} reserved"
    allows = facts.max_connections - reserved
    rooms = [Room(allows - facts.others_server - 1, words, allows, facts.others_server, 1)]
    if facts.role_limit >= 0:
        own = 1 if facts.own_in_role else 0
        rooms.append(
            Room(
                facts.role_limit - facts.others_role - own,
                f"role {facts.role} CONNECTION LIMIT {facts.role_limit}",
                facts.role_limit,
                facts.others_role,
                own,
                ROLE,
            )
        )
    if facts.database_limit >= 0:
        own = 1 if facts.own_in_database else 0
        rooms.append(
            Room(
                facts.database_limit - facts.others_database - own,
                f"database {facts.database} CONNECTION LIMIT {facts.database_limit}",
                facts.database_limit,
                facts.others_database,
                own,
                DATABASE,
            )
        )
    # Ties go to the narrowest limit: it is the one a user recognises and can change.
    return min(reversed(rooms), key=lambda room: room.budget)


#: How the warning of a configured budget above the room begins.
CONFIGURED_TOO_LARGE: Final = "the configured budget"


@dataclass(frozen=True)
class BudgetChoice:
    budget: int
    source: str
    #: Shown once in the summary: the configured budget was more than the server allows.
    warning: str | None = None
    #: The server has no room for the run's workers as things stand.
    no_room: bool = False


def choose_budget(configured: tuple[int, str] | None, room: Room) -> BudgetChoice:
    """The run's budget: the discovered room, or the configured budget when it is smaller.

    ``configured`` is (budget, where it came from) when the user set one. With no room at
    all the run is held to one connection at a time (the tests will meet the server's
    limit and say so), never to zero, which would stop it for good.
    """
    if room.budget < 1:
        return BudgetChoice(1, f"{room.describe()}: {NO_ROOM}", no_room=True)
    if configured is None:
        return BudgetChoice(room.budget, room.describe())
    wanted, origin = configured
    if wanted <= room.budget:
        return BudgetChoice(wanted, origin)
    warning = (
        f"{CONFIGURED_TOO_LARGE} {wanted} ({origin}) is more than the server allows this "
        f"login ({room.describe()}): the run uses {room.budget}"
    )
    return BudgetChoice(room.budget, f"{room.describe()}; configured {wanted}", warning)


def count_clients(
    clients: Collection[Client], role: str, database: str, runs: Collection[int] = ()
) -> tuple[int, int, int, int]:
    """Other clients' backends (not those of ``runs``, the run's own): on the whole
    server, of ``role``, in ``database``, and those whose backend type is hidden."""
    runs = set(runs)
    others = [client for client in clients if client[0] not in runs]
    return (
        len(others),
        sum(1 for _, of_role, _, _ in others if of_role == role),
        sum(1 for _, _, in_database, _ in others if in_database == database),
        sum(1 for *_, hidden in others if hidden),
    )


def recount(facts: ServerFacts, runs: Collection[int]) -> ServerFacts:
    """The facts with the backends ``runs`` counted as the run's own, not other clients'
    (pids the run learned to be its own after the facts were read)."""
    others, of_role, in_database, hidden = count_clients(
        facts.clients, facts.role, facts.database, runs
    )
    return dataclasses.replace(
        facts,
        others_server=others,
        others_role=of_role,
        others_database=in_database,
        hidden=hidden,
    )
