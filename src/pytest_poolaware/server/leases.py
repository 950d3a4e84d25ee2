"""This run's leases on the server: the advisory locks it holds on the plugin's own
connection, and its look at the locks the other runs hold.

A run holds slot leases, session-level advisory locks ``(slot class, n)``, one per
connection it may open (its own connection's included); it publishes its demand as
shared locks ``(demand class, 0..demand-1)``; one run at a time holds the priority, the
exclusive lock ``(priority class, 0)``, with how many connections it is for as a shared
lock ``(priority class, amount)``; a run a rerun of which waits for a connection says so
with the shared lock ``(priority class, RERUN_MARK)``. Every key carries the sharing
protocol's version (``share_plan.lock_key``): locks of another version are not read as
leases, their runs are named in ``Others.foreign``. Leases die with the session, so a
run killed or cut off frees them without anyone's help. The bookkeeping only: how many
to hold is ``share_plan``'s, when to move ``share``'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pytest_poolaware.server import sql
from pytest_poolaware.server.room import Room
from pytest_poolaware.server.share_plan import (
    DEPARTED_GRACE,
    RERUN_MARK,
    SHARE_PROTOCOL,
    STALLED_AFTER,
    DepartedRuns,
    Others,
    key_parts,
    lock_classes,
    lock_key,
)


class Leases:
    """The advisory locks of one run, in the lock classes of its name space and binding
    limit (``share_plan.lock_classes``). Moved by one thread at a time (the sharing's)."""

    def __init__(
        self,
        connection: Any,
        *,
        namespace: str,
        room: Room,
        scope_name: str,
        clock: Callable[[], float],
        departed_grace: float = DEPARTED_GRACE,
        stalled_after: float = STALLED_AFTER,
    ) -> None:
        self._conn = connection
        self._stalled_after = stalled_after
        self._allows = room.allows
        self._scope = room.scope
        #: The role or database whose connections the binding limit counts.
        self._scope_name = scope_name
        self._clock = clock
        self._departed = DepartedRuns(departed_grace)
        self._slot_class, self._demand_class, self._priority_class = lock_classes(
            namespace, room.limit
        )
        #: This run: the backend pid of the plugin's own connection.
        self.me: int = connection.info.backend_pid
        self._slots: list[int] = []  # slot numbers this run holds, in order taken
        self._demand_held = 0
        #: Slot numbers past the limit's this run may take: those stalled runs hold.
        self._beyond = 0
        #: Connections this run holds the priority for (0: it does not hold it).
        self.priority = 0
        #: Whether it holds ``RERUN_MARK``: a rerun of its waits for a connection.
        self.rerun_marked = False

    def remember(self, before: Leases) -> None:
        """Taken on a new connection after losing touch: the runs the old leases last
        saw are departed from now, not unknown. Their sessions may have been cut off at
        the same moment as this run's, and until they rejoin they may still use what
        they held (``SafeBudget``): forgotten, their room would be taken at once."""
        self._departed = before._departed

    @property
    def slots(self) -> int:
        """Slot leases held, the one for the run's own connection included."""
        return len(self._slots)

    def look(self) -> tuple[Others, int]:
        """What the other runs hold and want, and the live client connections the
        binding limit counts (this one left out)."""
        held: dict[int, int] = {}
        demand: dict[int, int] = {}
        amounts: dict[int, int] = {}
        foreign: dict[int, int] = {}
        reruns: set[int] = set()
        classes = (self._slot_class, self._demand_class, self._priority_class)
        for pid, cls, key in sql.advisory_locks(self._conn, classes):
            version, obj = key_parts(key)
            if version != SHARE_PROTOCOL:  # never read as leases: a client's connections
                foreign[pid] = version
                continue
            if cls == self._priority_class and obj == RERUN_MARK:
                reruns.add(pid)
                continue
            if cls == self._priority_class:
                amounts[pid] = max(amounts.get(pid, 0), obj)
                continue
            table = held if cls == self._slot_class else demand
            table[pid] = table.get(pid, 0) + 1
        holder = sql.priority_holder(self._conn, self._priority_class, lock_key(0))
        priority = None
        if holder is not None and holder != self.me:
            priority = (holder, amounts.get(holder, 0))
        live = sql.live_clients(self._conn, self._scope, self._scope_name)
        departed = self._departed.update(held, self._clock())
        stalled = self._stalled(held.keys() | demand.keys())
        if priority is not None and priority[0] in stalled:
            priority = None
        # The slot numbers a stalled run holds are taken, yet no longer honoured: the
        # others may use as many numbers past the limit's (given back when it resumes,
        # as the shares move).
        self._beyond = sum(held.get(run, 0) for run in stalled)
        return Others(
            {run: n for run, n in held.items() if run not in stalled},
            {run: n for run, n in demand.items() if run not in stalled},
            priority,
            departed,
            foreign,
            {run: max(0, held.get(run, 0) - 1) for run in stalled},
            frozenset(reruns - stalled - {self.me}),
        ), live

    def _stalled(self, runs: set[int]) -> set[int]:
        """The runs whose coordinating connection has been silent past ``stalled_after``
        (suspended or wedged: their locks live on with their session)."""
        if not runs:
            return set()
        silent = sql.silent_for(self._conn, sorted(runs))
        return {run for run, seconds in silent.items() if seconds > self._stalled_after}

    def claim_priority(self, others: Others, needed: bool, wants: int) -> Others:
        """Take the priority for an item that ``needed`` it, for ``wants`` connections
        (one run at a time holds it), give it back once no item needs it; returns
        ``others`` with the priority as it now stands."""
        if self.priority and not needed:
            self._set_priority_amount(0)
            sql.unlock(self._conn, self._priority_class, lock_key(0))
            self.priority = 0
        elif (
            needed
            and not self.priority
            and others.priority is None
            and sql.try_lock(self._conn, self._priority_class, lock_key(0))
        ):
            self.priority = -1  # held; its amount is set just below
        if self.priority and needed and self.priority != wants:
            self._set_priority_amount(wants)
        if self.priority:
            return dataclasses.replace(others, priority=(self.me, self.priority))
        return others

    def _set_priority_amount(self, amount: int) -> None:
        """Publish how many connections the priority is for (a shared lock on that key)."""
        if self.priority > 0:
            sql.unlock_shared(self._conn, self._priority_class, lock_key(self.priority))
        if amount > 0:
            sql.lock_shared(self._conn, self._priority_class, lock_key(amount))
        self.priority = amount

    def mark_rerun(self, waiting: bool) -> None:
        """Say whether a rerun of this run waits for a connection (``RERUN_MARK``)."""
        if waiting != self.rerun_marked:
            lock = sql.lock_shared if waiting else sql.unlock_shared
            lock(self._conn, self._priority_class, lock_key(RERUN_MARK))
            self.rerun_marked = waiting

    def set_demand(self, demand: int) -> None:
        """Publish the run's demand: one shared lock per connection wanted."""
        while self._demand_held < demand:
            sql.lock_shared(self._conn, self._demand_class, lock_key(self._demand_held))
            self._demand_held += 1
        while self._demand_held > demand:
            self._demand_held -= 1
            sql.unlock_shared(self._conn, self._demand_class, lock_key(self._demand_held))

    def move_to(self, hold: int) -> None:
        """Hold ``hold`` slot leases: give back the last taken, or take free slots (as
        many as can be had; never more slots than the limit allows, but for those
        stalled runs hold)."""
        while len(self._slots) > hold:
            sql.unlock(self._conn, self._slot_class, lock_key(self._slots.pop()))
        slot = 0
        taken = set(self._slots)
        while len(self._slots) < hold and slot < self._allows + self._beyond:
            if slot not in taken and sql.try_lock(self._conn, self._slot_class, lock_key(slot)):
                self._slots.append(slot)
            slot += 1
