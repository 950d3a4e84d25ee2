"""The run's budget over time (``budget.RunBudget``), without a server or xdist: each
input moves it as the summary says, and each change reaches the planner and the workers
once."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from pytest_poolaware.budget import Change, RunBudget
from pytest_poolaware.server.learning import REMEMBERED
from pytest_poolaware.server.room import (
    CONFIGURED_TOO_LARGE,
    ROLE,
    BudgetChoice,
    Room,
    ServerFacts,
    choose_budget,
    room_of,
)
from pytest_poolaware.shared.limits import Limits, RunUse
from pytest_poolaware.shared.protocol import RoomKnown, ServerSeen
from pytest_poolaware.shared.settings import Settings

LIMIT = "role app CONNECTION LIMIT 8"
#: The room of ``facts()`` with no other client: 8 less the plugin's own connection.
SOURCE = f"{LIMIT}, 1 kept for the monitor"


def facts(
    role: str = "app", database: str = "app", role_limit: int = 8, **more: object
) -> ServerFacts:
    values: dict[str, object] = {
        "version": 160000,
        "max_connections": 100,
        "superuser_reserved": 3,
        "reserved": 0,
        "role": role,
        "superuser": False,
        "uses_reserved": False,
        "role_limit": role_limit,
        "database": database,
        "database_limit": -1,
        "others_server": 0,
        "others_role": 0,
        "others_database": 0,
    }
    return ServerFacts(**{**values, **more})  # type: ignore[arg-type]


def other_login(role: str, limit: int) -> ServerFacts:
    """What the server says of another login of the tests: the plugin's own connection
    is not in its room."""
    return facts(role=role, role_limit=limit, own_in_role=False)


#: The room of ``other_login("batch", 4)``.
BATCH = "role batch CONNECTION LIMIT 4"


def login(n: int, user: str = "app") -> ServerSeen:
    return ServerSeen("db", 5432, f"app_gw{n}", user, None, "psycopg", 10 + n)


class Published:
    """A subscriber that keeps what it was told."""

    def __init__(self, budget: RunBudget[str]) -> None:
        self.changes: list[Change] = []
        self.start = budget.subscribe(self.changes.append)


class MovingShare:
    """The run's share of the room as the budget owner sees it (``share.Share``), moved
    by hand: the real one moves with other runs on a server."""

    def __init__(self, budget: int) -> None:
        self.now = self.ceiling = budget
        self.yielding = False
        self.reported: RunUse | None = None

    def limits(self) -> Limits:
        return Limits(self.now, self.ceiling, self.yielding)

    def cap(self, ceiling: int) -> None:
        self.ceiling = min(self.ceiling, ceiling)
        self.now = min(self.now, self.ceiling)

    def report(self, use: RunUse) -> None:
        self.reported = use

    def held_back_during(self, start: float, end: float) -> bool:
        return start <= 1.0 <= end

    def held_back_waits(
        self, nodeid: str, waits: Iterable[tuple[float, float]]
    ) -> tuple[tuple[float, float], ...]:
        """Held back by another run from 1.0 to 2.0."""
        return tuple((max(a, 1.0), min(b, 2.0)) for a, b in waits if a < 2.0 and b > 1.0)


def learned(budget: RunBudget[str], room: Room) -> None:
    """What the plugin's own connection does once the first login's room is read."""
    budget.discovered(choose_budget(budget.configured, room), room, sharing=False)
    budget.learned(room_read=True)


def test_a_configured_budget_alone_stays_and_publishes_nothing() -> None:
    budget: RunBudget[str] = RunBudget.from_settings(Settings(15, "--pool-budget"))
    seen = Published(budget)
    budget.poll()
    stats = budget.statistics()
    assert (stats.budget, stats.source, stats.room, stats.learning) == (
        15,
        "--pool-budget",
        None,
        False,
    )
    assert seen.start == Limits(15)
    assert seen.changes == []
    assert budget.to_remember() is None
    assert budget.notes() == []


def test_the_last_run_s_budget_stands_in_only_when_smaller() -> None:
    budget = RunBudget[str](15, "--pool-budget")
    budget.remember({"budget": 20, "source": SOURCE})
    budget.remember("not what the cache held")
    assert budget.statistics().budget == 15
    budget.remember({"budget": 7, "source": SOURCE})
    assert (budget.budget, budget.source) == (7, f"{SOURCE}, {REMEMBERED}")


def test_the_learned_room_is_the_budget_and_the_workers_hear_it_once() -> None:
    budget = RunBudget[str](15, "PG_POOL_SIZE + PG_MAX_OVERFLOW = 5 + 10", configured=False)
    seen = Published(budget)
    learned(budget, room_of(facts()))
    assert seen.changes == []  # published when polled: one change, whatever it took
    budget.poll()
    budget.poll()
    assert seen.changes == [Change(Limits(7), RoomKnown(7, 8, LIMIT))]
    assert (budget.budget, budget.source, budget.room) == (7, SOURCE, (8, LIMIT))
    assert budget.to_remember() == {"budget": 7, "source": SOURCE}
    assert budget.warnings == []


def test_a_configured_budget_above_the_room_is_warned_about() -> None:
    budget = RunBudget[str](30, "--pool-budget")
    learned(budget, room_of(facts()))
    assert budget.budget == 7
    assert budget.source == f"{SOURCE}; configured 30"
    [warning] = budget.warnings
    assert warning.startswith(f"{CONFIGURED_TOO_LARGE} 30 (--pool-budget)")


def test_a_configured_budget_below_the_room_is_kept() -> None:
    budget = RunBudget[str](3, "--pool-budget")
    seen = Published(budget)
    learned(budget, room_of(facts()))
    budget.poll()
    assert (budget.budget, budget.source, budget.room, budget.warnings) == (
        3,
        "--pool-budget",
        None,
        [],
    )
    assert seen.changes == []  # neither the planner's budget nor the workers' moved


def test_a_tighter_login_lowers_the_budget_and_names_itself() -> None:
    budget = RunBudget[str](15, "pool", configured=False)
    seen = Published(budget)
    learned(budget, room_of(facts()))
    budget.poll()
    budget.login_read(login(1, "batch"), other_login("batch", 4), [10])
    budget.login_read(login(2, "audit"), "permission denied for table pg_authid", [10])
    budget.poll()
    assert budget.budget == 4
    assert budget.source == (f"{BATCH}; batch@db:5432/app_gw1 binds, the tightest of 2 logins")
    assert budget.room == (4, BATCH)
    assert seen.changes[-1] == Change(Limits(4), RoomKnown(4, 4, BATCH))
    assert budget.notes() == [
        "tests also connected as batch@db:5432/app_gw1: room 4 (role batch CONNECTION LIMIT 4)",
        "tests also connected as audit@db:5432/app_gw2: what the server allows that login "
        "could not be read (permission denied for table pg_authid); the budget leaves it out",
    ]


def test_the_run_s_own_connections_are_not_other_clients_in_the_budget_line() -> None:
    """A login read while two workers' connections were open that their workers had not
    reported yet counts them as other clients; once they are known (another login is
    read), the budget is counted again without them, and the budget line names as many
    logins as the notes."""
    budget = RunBudget[str](7, SOURCE, configured=False)
    budget.discovered(BudgetChoice(7, SOURCE), Room(7, LIMIT, 8, 0, 1, ROLE), sharing=False)
    budget.learned(room_read=True)
    clients = ((10, "app", "app_gw0", False), (11, "app", "app", False), (12, "app", "app", False))
    seen = [login(n) for n in range(4)]

    def read(login: ServerSeen) -> ServerFacts:
        return dataclasses.replace(facts(), database=login.dbname, clients=clients)

    budget.login_read(seen[0], read(seen[0]), [10])
    assert budget.budget == 5
    assert "2 held by other clients" in budget.source
    for other in seen[1:]:  # 11 and 12 were the workers' own
        budget.login_read(other, read(other), [10, 11, 12, 13])
    assert budget.budget == 7
    assert budget.source == SOURCE
    assert budget.other_logins.notes() == [
        f"tests also connected as 4 logins (app@db:5432/app_gw0, app@db:5432/app_gw1, "
        f"app@db:5432/app_gw2 and 1 more): room 7 ({SOURCE})"
    ]


def test_the_planner_follows_the_share_and_the_workers_the_room() -> None:
    budget = RunBudget[str](30, "--pool-budget")
    learned_room = room_of(facts(role_limit=20))
    budget.discovered(choose_budget(budget.configured, learned_room), learned_room, sharing=True)
    ceiling = budget.share_room(learned_room)
    assert ceiling == 19
    share = MovingShare(ceiling)
    budget.take_share(share)
    seen = Published(budget)
    assert seen.start == Limits(19, 19)
    share.now, share.yielding = 12, True  # another run took some of the room
    budget.poll()
    budget.poll()
    assert seen.changes == [Change(planner=Limits(12, 19, give_way=True))]
    assert budget.budget == 19  # what a test may have alone: the room, not the share
    assert budget.held_back_during(0.5, 2.0)
    use = RunUse(in_use=3, open=4, pending=True, wants=5, using=12)
    budget.report_use(use)
    assert share.reported == use


def test_a_tighter_login_caps_the_share() -> None:
    budget = RunBudget[str](30, "--pool-budget", configured=False)
    room = room_of(facts(role_limit=20))
    budget.discovered(choose_budget(None, room), room, sharing=True)
    share = MovingShare(budget.share_room(room) or 0)
    budget.take_share(share)
    budget.learned(room_read=True)
    seen = Published(budget)
    budget.login_read(login(1, "batch"), other_login("batch", 4), [10])
    budget.poll()
    assert (share.now, share.ceiling) == (4, 4)
    assert seen.changes == [Change(Limits(4, 4), RoomKnown(4, 4, BATCH))]


def test_a_login_that_leaves_the_budget_publishes_nothing() -> None:
    budget = RunBudget[str](15, "pool", configured=False)
    learned(budget, room_of(facts()))
    seen = Published(budget)
    budget.login_read(login(1, "wide"), other_login("wide", 50), [10])
    budget.poll()
    assert seen.changes == []
    assert (budget.budget, budget.source) == (7, SOURCE)
