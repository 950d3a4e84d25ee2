"""The rooms of the other logins a run's tests use on the learned server, counted so that
the budget line and the notes agree: the same rooms, the same number of logins, and the
run's own connections never counted as other clients'.

Pure: the facts are read elsewhere (``discovery.read_facts``, on the plugin's own
connection); here they are only counted again and put in words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Final

from pytest_poolaware.server.room import (
    BudgetChoice,
    Room,
    ServerFacts,
    choose_budget,
    recount,
    room_of,
)

#: Logins named in the note of logins that share one room; the others are counted.
NAMED_LOGINS: Final = 3


def own_connections_out(facts: ServerFacts, runs: Collection[int], run_open: int) -> ServerFacts:
    """The facts with the run's own backends out of the other clients: those of ``runs``
    (pids the workers reported), and as many more of the unknown ones as the workers
    counted open beyond those (a worker reports the pid of its first connection per login
    only). Counted against each limit as far as that limit's others go."""
    counted = recount(facts, runs)
    ours = set(runs)
    known = sum(1 for pid, *_ in facts.clients if pid in ours)
    unknown = max(0, run_open - known)
    if not unknown:
        return counted
    return dataclasses.replace(
        counted,
        others_server=max(0, counted.others_server - unknown),
        others_role=max(0, counted.others_role - unknown),
        others_database=max(0, counted.others_database - unknown),
    )


@dataclass(frozen=True)
class FirstLogin:
    """The budget as the first login's room set it (the others can only lower it)."""

    budget: int
    source: str
    #: (what the server allows the login, the binding limit) when the budget is the room.
    room: tuple[int, str] | None
    #: The warning of a configured budget above that room, if any.
    warning: str | None = None


@dataclass(frozen=True)
class Binding:
    """The login whose room is the tightest."""

    where: str
    room: Room
    choice: BudgetChoice


@dataclass
class OtherLogins:
    """The other logins read, in order, with their rooms as last counted."""

    facts: dict[str, ServerFacts] = field(default_factory=dict)
    rooms: dict[str, Room] = field(default_factory=dict)
    #: Connections the workers counted open when each login was read.
    run_open: dict[str, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.facts)

    def add(self, where: str, facts: ServerFacts, run_open: int = 0) -> None:
        """``facts`` were read while the run's workers counted ``run_open`` connections
        open (every login's): those the server listed without a pid the run knows are the
        run's own, as many as the workers counted beyond the pids it knows."""
        self.facts[where] = facts
        self.run_open[where] = run_open

    def bind(self, configured: tuple[int, str] | None, runs: Collection[int]) -> Binding | None:
        """Count every login's room again, the backends ``runs`` being the run's own, and
        return the tightest (the first read among equals); None when none was read."""
        self.rooms = {
            where: room_of(own_connections_out(facts, runs, self.run_open.get(where, 0)))
            for where, facts in self.facts.items()
        }
        tightest: Binding | None = None
        for where, room in self.rooms.items():
            choice = choose_budget(configured, room)
            if tightest is None or choice.budget < tightest.choice.budget:
                tightest = Binding(where, room, choice)
        return tightest

    def notes(self) -> list[str]:
        """One note per room: the logins that have it (a few named, all counted)."""
        groups: dict[tuple[int, str], list[str]] = {}
        for where, room in self.rooms.items():
            groups.setdefault((room.budget, room.describe()), []).append(where)
        notes = []
        for (budget, words), wheres in groups.items():
            if len(wheres) == 1:
                who = wheres[0]
            else:
                named = ", ".join(wheres[:NAMED_LOGINS])
                rest = len(wheres) - NAMED_LOGINS
                who = f"{len(wheres)} logins ({named}{f' and {rest} more' if rest > 0 else ''})"
            notes.append(f"tests also connected as {who}: room {budget} ({words})")
        return notes
