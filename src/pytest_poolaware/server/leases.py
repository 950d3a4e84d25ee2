"""This run's leases on the server: the advisory locks it holds on the plugin's own
connection, and its look at the locks the other runs hold.

A run holds slot leases, session-level advisory locks ``(slot class, n)``, one per
connection it may open (its own connection's included); it publishes its demand as
shared locks ``(demand class, 0..demand-1)``. While it waits for room its leases do not
cover, it holds a ticket, the shared lock ``(ticket class, stamp)`` (the server's clock
when it asked), and the leases it asks for as ``(priority class, amount)``; a test
of its waiting mid-test says so with ``(priority class, STUCK_MARK)``, a rerun's with
``(priority class, RERUN_MARK)`` as well. Every key carries the sharing
protocol's version (``share_plan.lock_key``): locks of another version are not read as
leases, their runs are named in ``Others.foreign``. Leases die with the session, so a
run killed or cut off frees them without anyone's help. The bookkeeping only: how many
to hold is ``share_plan``'s, when to move ``share``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pytest_poolaware.server import sql
from pytest_poolaware.server.room import Room
from pytest_poolaware.server.share_plan import (
    DEPARTED_GRACE,
    RERUN_MARK,
    SHARE_PROTOCOL,
    STALLED_AFTER,
    STUCK_MARK,
    TICKET_MODULUS,
    DepartedRuns,
    Others,
    Ticket,
    key_parts,
    lock_classes,
    lock_key,
    ticket_order,
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
        classes = lock_classes(namespace, room.limit)
        self._classes = classes
        self._slot_class, self._demand_class, self._priority_class, self._ticket_class = classes
        #: This run: the backend pid of the plugin's own connection.
        self.me: int = connection.info.backend_pid
        self._slots: list[int] = []  # slot numbers this run holds, in order taken
        self._demand_held = 0
        #: Slot numbers past the limit's this run may take: those stalled runs hold.
        self._beyond = 0
        #: This run's ticket: its stamp (None: it waits for nothing its budget does not
        #: cover), and the leases it asks for (``Ticket.amount``).
        self.stamp: int | None = None
        self._amount = 0
        #: Whether it holds ``STUCK_MARK`` and ``RERUN_MARK``.
        self.stuck_marked = self.rerun_marked = False
        #: The last test that waited mid-test with a ticket, and that ticket's stamp: a
        #: test that grows one connection at a time asks again for each, and keeps its
        #: age (a younger ticket could make it give way to a test that came after it).
        self._kept: tuple[int, int] | None = None

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
        """What the other runs hold and want, the ticket queue, and the live client
        connections the binding limit counts (this one left out)."""
        held: dict[int, int] = {}
        demand: dict[int, int] = {}
        amounts: dict[int, int] = {}
        stamps: dict[int, int] = {}
        foreign: dict[int, int] = {}
        marks: dict[int, set[int]] = {}
        for pid, cls, key in sql.advisory_locks(self._conn, self._classes):
            version, obj = key_parts(key)
            if version != SHARE_PROTOCOL:  # never read as leases: a client's connections
                foreign[pid] = version
            elif cls == self._ticket_class:
                stamps[pid] = obj
            elif cls == self._priority_class and obj in (RERUN_MARK, STUCK_MARK):
                marks.setdefault(pid, set()).add(obj)
            elif cls == self._priority_class:
                amounts[pid] = max(amounts.get(pid, 0), obj)
            else:
                table = held if cls == self._slot_class else demand
                table[pid] = table.get(pid, 0) + 1
        live = sql.live_clients(self._conn, self._scope, self._scope_name)
        departed = self._departed.update(held, self._clock())
        stalled = self._stalled(held.keys() | demand.keys())
        tickets = []
        for run, stamp in stamps.items():
            if run not in stalled and run not in foreign:
                marked = marks.get(run, set())
                tickets.append(
                    Ticket(
                        run, stamp, amounts.get(run, 0), STUCK_MARK in marked, RERUN_MARK in marked
                    )
                )
        if self.stamp is not None:
            tickets.append(
                Ticket(self.me, self.stamp, self._amount, self.stuck_marked, self.rerun_marked)
            )
        # The slot numbers a stalled run holds are taken, yet no longer honoured: the
        # others may use as many numbers past the limit's (given back when it resumes,
        # as the shares move).
        self._beyond = sum(held.get(run, 0) for run in stalled)
        return Others(
            {run: n for run, n in held.items() if run not in stalled},
            {run: n for run, n in demand.items() if run not in stalled},
            ticket_order(tickets),
            departed,
            foreign,
            {run: max(0, held.get(run, 0) - 1) for run in stalled},
        ), live

    def _stalled(self, runs: set[int]) -> set[int]:
        """The runs whose coordinating connection has been silent past ``stalled_after``
        (suspended or wedged: their locks live on with their session)."""
        if not runs:
            return set()
        silent = sql.silent_for(self._conn, sorted(runs))
        return {run for run, seconds in silent.items() if seconds > self._stalled_after}

    def request(self, amount: int, *, stuck: int | None, rerun: bool) -> None:
        """Hold a ticket while the run asks for ``amount`` test leases (``Ticket.amount``;
        0: it asks for nothing more: the ticket, if any, is given back). A ticket is
        stamped once, with the server's clock, and kept until the request is served:
        requests are served in the order they were made (``ticket_order``). ``stuck``:
        the test waiting mid-test (None: none), which keeps its first ticket's stamp."""
        amount = max(0, amount)
        # The amount and the marks first, the new amount before the old goes: the
        # others never read a ticket without them (``look`` takes the largest amount).
        if amount != self._amount:
            if amount:
                sql.lock_shared(self._conn, self._priority_class, lock_key(amount))
            if self._amount:
                sql.unlock_shared(self._conn, self._priority_class, lock_key(self._amount))
            self._amount = amount
        self.stuck_marked = self._mark(
            STUCK_MARK, self.stuck_marked, stuck is not None and amount > 0
        )
        self.rerun_marked = self._mark(RERUN_MARK, self.rerun_marked, rerun and amount > 0)
        if not amount and self.stamp is not None:
            sql.unlock_shared(self._conn, self._ticket_class, lock_key(self.stamp))
            self.stamp = None
        elif amount and self.stamp is None:
            known = stuck is not None and stuck >= 0
            if known and self._kept is not None and self._kept[0] == stuck:
                stamp = self._kept[1]
            else:
                stamp = sql.server_ticks(self._conn, TICKET_MODULUS)
            sql.lock_shared(self._conn, self._ticket_class, lock_key(stamp))
            self.stamp = stamp
            self._kept = (stuck, stamp) if known and stuck is not None else None

    def _mark(self, mark: int, marked: bool, wanted: bool) -> bool:
        """Hold the shared lock ``(priority class, mark)`` or not; returns ``wanted``."""
        if wanted != marked:
            lock = sql.lock_shared if wanted else sql.unlock_shared
            lock(self._conn, self._priority_class, lock_key(mark))
        return wanted

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
