"""Runs against one server share its room, coordinating through the server itself.

Each run holds slot leases: session-level advisory locks ``(slot class, n)`` taken on
the plugin's own connection, one per connection the run may open. A run publishes its
demand as shared locks ``(demand class, 0..demand-1)``. Every run reads the others'
leases and demands from ``pg_locks`` and the live connection count from
``pg_stat_activity``, and moves towards its share: the room divided by demand, max-min
fair, so a run alone gets all of it. Leases die with the session, so a run killed or cut
off (TCP keepalives) frees its share without anyone's help; since its workers'
connections may outlive it for a moment, a run never takes more than the live count
leaves free.

``fair_shares`` and ``plan`` are pure; ``ShareCoordinator`` does the talking, in a
background thread, and the scheduler reads ``budget()`` before it grants.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pytest_poolaware.server.room import (
    CLOSING_SLACK,
    DATABASE,
    ROLE,
    Room,
    ServerFacts,
    connection_failure,
)
from pytest_poolaware.shared.clock import monotonic, wall

#: Seconds between two looks at the other runs: a share moves within about this long.
LEASE_INTERVAL: Final = 0.1
#: Seconds a run waits at the start for the others to make room for its first share.
START_WAIT: Final = 5.0
#: Seconds the leases of a run that vanished (killed, cut off, or just ended) still count
#: as taken: its workers may be opening connections its controller granted just before,
#: which the server's live count does not show yet.
DEPARTED_GRACE: Final = 1.0


def lock_classes(namespace: str, limit: str) -> tuple[int, int, int]:
    """Advisory-lock class ids (slots, demand, priority) of one name space and one
    binding limit: runs share only with runs that meet the same limit in the same name
    space."""
    digest = hashlib.blake2b(f"{namespace}\0{limit}".encode(), digest_size=12).digest()
    mask = 0x7FFFFFFF  # non-negative: pg_locks shows the keys as oid
    slot, demand, priority = (
        int.from_bytes(digest[i : i + 4], "big") & mask for i in range(0, 12, 4)
    )
    return slot, demand, priority


def shares_with_priority(
    total: int, demands: Mapping[int, int], priority: tuple[int, int] | None
) -> dict[int, int]:
    """``fair_shares``, but the run holding the priority (run id, connections) gets that
    many first: one item that needs more than its run's fair share is served before the
    shares are evened out again (one at a time, first come, first served)."""
    if priority is None or priority[0] not in demands:
        return fair_shares(total, demands)
    run, amount = priority
    # Every other run that wants room keeps one connection: nobody is left with none.
    keep = sum(1 for other, demand in demands.items() if other != run and demand > 0)
    first = max(0, min(amount, total - keep, demands[run]))
    others = {other: demand for other, demand in demands.items() if other != run}
    shares = fair_shares(total - first, others)
    shares[run] = min(demands[run], total - sum(shares.values()))
    return shares


def fair_shares(total: int, demands: Mapping[int, int]) -> dict[int, int]:
    """Max-min fair integer split of ``total`` among ``demands`` (by run id): nobody gets
    more than it asks for; what one does not need goes to the others; the rest of an
    uneven split goes to the lowest ids, so every run computes the same split."""
    shares = dict.fromkeys(demands, 0)
    left = max(0, total)
    wanting = sorted(run for run, demand in demands.items() if demand > 0)
    while left > 0 and wanting:
        each = max(1, left // len(wanting))
        for run in list(wanting):
            give = min(each, demands[run] - shares[run], left)
            shares[run] += give
            left -= give
            if shares[run] >= demands[run]:
                wanting.remove(run)
            if left == 0:
                break
    return shares


@dataclass(frozen=True)
class Others:
    """What the other runs in the same name space hold and want (from ``pg_locks``)."""

    #: Run (backend pid) -> slot leases, the one for its own connection included.
    held: Mapping[int, int]
    demand: Mapping[int, int]
    #: The run (any, this one included) holding the priority, and for how many.
    priority: tuple[int, int] | None = None
    #: Test leases of runs that vanished less than ``DEPARTED_GRACE`` ago: still taken.
    departed: int = 0

    @property
    def slotless(self) -> int:
        """Runs with a demand but no slot yet: each still has its own connection open."""
        return sum(1 for run in self.demand if not self.held.get(run))


class DepartedRuns:
    """The runs gone from ``pg_locks`` within ``grace`` seconds, and their test leases.

    A run's leases vanish the moment its connection does, but its workers may still be
    opening connections its controller granted just before, which the server's live
    count does not show yet: those leases stay taken for ``grace``.
    """

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._last: dict[int, int] = {}
        #: Run -> (test leases, when it was first seen gone).
        self._gone: dict[int, tuple[int, float]] = {}

    def update(self, held: Mapping[int, int], now: float) -> int:
        """The other runs' slots (their own connection's included) as seen ``now``;
        returns the test leases of the runs that departed within the grace."""
        for run, slots in self._last.items():
            if run not in held and run not in self._gone:
                self._gone[run] = (max(0, slots - 1), now)
        self._gone = {
            run: (leases, since)
            for run, (leases, since) in self._gone.items()
            if run not in held and now - since < self.grace
        }
        self._last = dict(held)
        return sum(leases for leases, _ in self._gone.values())


class HeldBack:
    """When a run was held back by other runs (below what it wanted): spans of
    ``time.time()``, which the scheduler compares with tests' start and end, and their
    total on the run's own clock. The sharing thread writes it, the scheduler reads it.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        #: Seconds held below what the run wanted by other runs, and when that began.
        self.seconds = 0.0
        self._since: float | None = None
        self._tick = 0.0
        self._spans: list[tuple[float, float]] = []

    def during(self, start: float, end: float) -> bool:
        """Whether the run was held back between two ``time.time()``s."""
        with self._lock:
            spans = list(self._spans)
            ongoing = self._since
        if ongoing is not None and ongoing <= end:
            return True
        return any(begin <= end and start <= finish for begin, finish in spans)

    def note(self, held_back: bool) -> None:
        """Whether the run is held back now: a span begins or ends."""
        now, tick = wall(), self._clock()
        with self._lock:
            if held_back and self._since is None:
                self._since = now
                self._tick = tick
            elif not held_back and self._since is not None:
                self._close_locked(now, tick)

    def close(self, now: float) -> None:
        """End the ongoing span, if any (the run stops sharing)."""
        with self._lock:
            if self._since is not None:
                self._close_locked(now, self._clock())

    def _close_locked(self, now: float, tick: float) -> None:
        assert self._since is not None
        self._spans.append((self._since, now))
        self.seconds += max(0.0, tick - self._tick)
        self._since = None


@dataclass(frozen=True)
class Plan:
    #: Leases to hold once this step is done, and the budget the planner may use now.
    hold: int
    budget: int
    #: The run's fair share, and whether it is held below what it wants by other runs.
    share: int
    held_back: bool
    #: The most this run could get with the priority: the room less the other runs' own
    #: connections and the clients that take no part.
    reachable: int


def kept_by_others(others: Others) -> int:
    """Slots the other runs may fill at any moment, live now or not: each one's own
    connection, its leases beyond its last one, and a departed run's leases. An item
    overdue with the priority may go past its share only into the rest: the others'
    last leases, while the server's live count shows them unused (they keep one each
    as long as they have work left, which would otherwise shut such an item out)."""
    return (
        others.departed + others.slotless + sum(max(1, slots - 1) for slots in others.held.values())
    )


def plan(
    *,
    me: int,
    allows: int,
    held: int,
    demand: int,
    in_use: int,
    others: Others,
    live_others: int,
    ceiling: int | None = None,
) -> Plan:
    """One step towards this run's share.

    ``allows`` is what the binding limit allows in all; every run's own connection takes
    one slot of it. ``live_others`` counts the client connections in the limit's scope
    that are not this run's (its workers' nor its own). Others occupy the larger of what
    they lease and what is live, so lingering connections of a dead run, and clients that
    do not take part, are never leased out twice. A run above its share gives back what
    it does not use, and meanwhile starts nothing new above the share.
    """
    runs = len(others.held.keys() | others.demand.keys())
    # Every run leases a slot for its own connection first (``held`` counts it); one
    # that could not yet still has that connection open.
    others_leased = sum(others.held.values()) + others.slotless + others.departed
    outsiders = max(0, live_others - others_leased)
    pool = allows - 1 - runs - outsiders - CLOSING_SLACK
    demands = {**{run: others.demand.get(run, 0) for run in others.held}, **others.demand}
    demands[me] = demand
    share = shares_with_priority(pool, demands, others.priority)[me]
    if not runs and demand:
        # Alone: the whole room (up to the run's own ceiling), not just what it asked
        # for the moment before.
        share = max(share, pool if ceiling is None else min(pool, ceiling))
    free = allows - 1 - CLOSING_SLACK - max(others_leased, live_others) - held
    # Below the share: take what is free. Above it: give back what is not in use.
    grow = held + max(0, min(max(share, in_use) - held, free))
    hold = grow if held < max(share, in_use) else max(share, min(held, in_use))
    if demand and held:
        hold = max(hold, 1)  # a run with work left never gives up its last lease
    budget = max(1, min(hold, share)) if demand else max(1, hold)
    return Plan(
        hold, budget, share, held_back=bool(runs) and share < demand, reachable=max(1, pool)
    )


#: Seconds a run waits for its share to grow for an item that needs more than it has
#: before it stops waiting on the other runs: a test of its that holds connections and
#: waits for more gives way (it is rerun alone), unless the run holds the priority; an
#: item waiting to start takes the priority and may then go past the share, but only as
#: far as the server's live count leaves room. Well below the connect gate's timeout, so
#: that a cross-run wait ends here, never by a worker connecting past the room.
GROWTH_WAIT: Final = 10.0


def share_growth_wait(gate_timeout: float) -> float:
    """How long an item waits for its share to grow: ``GROWTH_WAIT``, and at most half
    the connect gate's timeout, so that the wait ends here, on the run's terms."""
    return max(LEASE_INTERVAL, min(GROWTH_WAIT, gate_timeout / 2))


_LOCKS: Final = """
SELECT pid, classid::bigint, objid::bigint
FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND pid <> pg_backend_pid()
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid::bigint IN (%s, %s, %s)
"""
_PRIORITY_HOLDER: Final = """
SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND mode = 'ExclusiveLock'
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid::bigint = %s AND objid::bigint = 0
"""
_CLIENTS: Final = (
    "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
    "AND (backend_type = 'client backend' "
    "OR (backend_type IS NULL AND usesysid IS NOT NULL AND datid IS NOT NULL))"
)
_LIVE_BY_SCOPE: Final = {
    ROLE: _CLIENTS + " AND usename = %s",
    DATABASE: _CLIENTS + " AND datname = %s",
}


class ShareCoordinator:
    """This run's leases on the plugin's own connection, kept moving towards its share.

    The scheduler tells it what the run uses and wants (``report``) and reads the budget
    (``budget``) before it grants; ``on_change`` wakes the scheduler when that moves.
    Any failure of the connection ends the sharing with a ``problem`` note; the run keeps
    its last budget and carries on.
    """

    def __init__(
        self,
        connection: Any,
        *,
        namespace: str,
        facts: ServerFacts,
        room: Room,
        ceiling: int,
        on_change: Callable[[], None] = lambda: None,
        interval: float = LEASE_INTERVAL,
        clock: Callable[[], float] = monotonic,
        growth_wait: float = GROWTH_WAIT,
        departed_grace: float = DEPARTED_GRACE,
    ) -> None:
        self._conn = connection
        self._growth_wait = growth_wait
        self._departed = DepartedRuns(departed_grace)
        self.namespace = namespace
        self.room = room
        self.ceiling = ceiling
        #: The ceiling the room itself allows: ``cap`` never raises the budget above it.
        self._room_ceiling = ceiling
        self._on_change = on_change
        self._interval = interval
        self._clock = clock
        self._slot_class, self._demand_class, self._priority_class = lock_classes(
            namespace, room.limit
        )
        self._scope_param = facts.role if room.scope == ROLE else facts.database
        self._me: int = connection.info.backend_pid
        self._slots: list[int] = []  # slot numbers this run holds, in order taken
        self._demand_held = 0
        self._lock = threading.Lock()
        #: Until the first step, the run's own budget (what it would use with sharing off).
        self._budget = ceiling
        self._share = ceiling
        self._demand = ceiling
        #: Connections an item held back by the budget expects (``report``).
        self._wants = 0
        #: Connections this run holds the priority for (0: it does not hold it).
        self._priority = 0
        self._priority_elsewhere = False
        self._reachable = ceiling
        self._wanting_since = 0.0
        #: An item has waited ``growth_wait`` for the share to grow (``step``).
        self._overdue = False
        #: This run's own waiting tests give way (overdue, without the priority).
        self._yield = False
        #: What the server's live count leaves free for this run's tests right now.
        self._live_free = ceiling
        #: Times an overdue wait ended by a test giving way, and by going past the share
        #: within the live room.
        self.gave_way = 0
        self.went_past = 0
        self._in_use = 0
        self._open = 0
        self.problem: str | None = None
        self.peers_seen = 0
        self._held_back = HeldBack(clock)
        self.lowest = ceiling
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the scheduler calls ------------------------------------------------------------

    def budget(self) -> int:
        with self._lock:
            return self._budget

    def ceiling_now(self) -> int:
        """What the budget may still grow to: the room less what cannot be had (the
        other runs' own connections, clients that take no part)."""
        with self._lock:
            return self._reachable

    def cap(self, ceiling: int) -> None:
        """Another login of the run's tests allows less than the room shared: the run's
        budget never goes above ``ceiling`` from now on (a later call may raise it again,
        never above the room shared: that login was read to allow more once connections
        counted as other clients' proved to be the run's own). Leases still follow the
        shared room's limit (the first login's), so runs binding on the other login's
        limit do not coordinate on it (``docs/design.md``, "Several logins")."""
        with self._lock:
            self.ceiling = min(self._room_ceiling, ceiling)
            self._budget = min(self._budget, self.ceiling)
            self._reachable = min(self._reachable, self.ceiling)
        self._on_change()

    def give_way(self) -> bool:
        """Whether this run's blocked items give way: another run holds the priority, or
        this run's own wait for its share to grow went on too long (wait-die across runs:
        the run without the priority yields)."""
        with self._lock:
            return self._priority_elsewhere or self._yield

    def report(
        self, *, in_use: int, open_: int, pending: bool, wants: int = 0, using: int = 0
    ) -> None:
        """What the run holds committed and open now, whether it has work left, the need
        of the largest item held back by the budget (0: none), and the budget the
        planner now uses: leases are never given back below it, since the planner may
        grant up to it before it hears of a smaller one."""
        with self._lock:
            self._in_use = max(in_use, using)
            self._open = open_
            # Demand: what it holds, and room for the item it waits to start (or one
            # more connection when nothing waits), as long as it has work left.
            wanted = in_use + max(wants, 1)
            self._demand = min(self.ceiling, wanted) if pending else in_use
            self._wants = wants

    def held_back_during(self, start: float, end: float) -> bool:
        """Whether the run was held back by another run between two ``time.time()``s."""
        return self._held_back.during(start, end)

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> int:
        """Take a first share (waiting a little for others to make room), then keep it
        moving in the background; returns the starting budget."""
        deadline = self._clock() + START_WAIT
        while self.step() and self.budget() < self.ceiling and self._clock() < deadline:
            if self._share <= len(self._slots) or self._stop.wait(self._interval):
                break
        if self.problem is None:
            self._thread = threading.Thread(target=self._run, name="poolaware-share", daemon=True)
            self._thread.start()
        return self.budget()

    def stop(self) -> None:
        """Stop moving; the leases go with the connection, which its owner closes."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self._held_back.close(wall())

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if not self.step():
                return

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> bool:
        """Look at the others and move this run's leases; False once sharing has failed."""
        try:
            others, live = self._look()
            with self._lock:
                demand, in_use, open_ = self._demand, self._in_use, self._open
                wants, budget_now = self._wants, self._budget
            others = self._claim_priority(others, wants, budget_now)
            step = plan(
                me=self._me,
                allows=self.room.allows,
                held=max(0, len(self._slots) - 1),
                demand=demand,
                in_use=in_use,
                others=others,
                live_others=max(0, live - open_),
                ceiling=self.ceiling,
            )
            self._set_demand(demand)
            # What the server could take now: the limit less every client connection but
            # this run's own tests' (its own connection and the closing slot kept free),
            # and less what the others may open without asking anyone.
            occupied = max(live - open_, kept_by_others(others))
            self._live_free = max(0, self.room.allows - 1 - CLOSING_SLACK - occupied)
            # One slot more than the tests': the plugin's own connection takes one too,
            # so that all runs' slot locks together never exceed what the limit allows.
            self._move_to(step.hold + 1, others)
        except Exception as exc:
            self.problem = (
                f"sharing the server's room stopped: {connection_failure(self._conn, exc)}; "
                "the run keeps "
                f"its last budget ({self.budget()}) without coordinating"
            )
            with self._lock:  # nothing will move it any more: never wait for growth
                self._reachable = self._budget
                self._priority_elsewhere = False
                self._yield = False
            self._on_change()
            return False
        self.peers_seen = max(self.peers_seen, len(others.held.keys() | others.demand.keys()))
        self._share = step.share
        budget = max(1, min(step.budget, len(self._slots) - 1, self.ceiling))
        # Held back by another run: a test waits for room, and the run has less than it
        # would have alone.
        self._held_back.note(step.held_back and wants > budget and budget < self.ceiling)
        reachable = min(self.ceiling, step.reachable)
        elsewhere = others.priority is not None and others.priority[0] != self._me
        overdue = False
        if wants > budget:
            self._wanting_since = self._wanting_since or self._clock()
            overdue = self._clock() - self._wanting_since > self._growth_wait
        else:
            self._wanting_since = 0.0
        # The share did not grow in time: never wait on another run for ever, and never
        # go past what the server has free. Without the priority, this run's waiting
        # tests give way; with it (the item cannot be served while the other runs keep
        # their last connection), the item goes past the share if the live count leaves
        # it room, and else waits for the others' tests to end.
        yield_ = overdue and not self._priority
        # The run's connections once the item has what it wants past the budget.
        after = max(open_, budget) + wants - budget
        past = overdue and bool(self._priority) and after <= self._live_free
        if past:
            reachable = budget
        self._overdue = overdue
        with self._lock:
            changed = (budget, reachable, elsewhere, yield_) != (
                self._budget,
                self._reachable,
                self._priority_elsewhere,
                self._yield,
            )
            if yield_ and not self._yield:
                self.gave_way += 1
            if past and self._reachable != reachable:
                self.went_past += 1
            self._budget = budget
            self._reachable = reachable
            self._priority_elsewhere = elsewhere
            self._yield = yield_
            self.lowest = min(self.lowest, budget)
        if changed:
            self._on_change()
        return True

    def _look(self) -> tuple[Others, int]:
        held: dict[int, int] = {}
        demand: dict[int, int] = {}
        amounts: dict[int, int] = {}
        classes = (self._slot_class, self._demand_class, self._priority_class)
        for pid, cls, obj in self._conn.execute(_LOCKS, classes).fetchall():
            if cls == self._priority_class:
                amounts[pid] = max(amounts.get(pid, 0), int(obj))
                continue
            table = held if cls == self._slot_class else demand
            table[pid] = table.get(pid, 0) + 1
        holder = self._conn.execute(_PRIORITY_HOLDER, (self._priority_class,)).fetchone()
        priority = None
        if holder is not None and holder[0] != self._me:
            priority = (int(holder[0]), amounts.get(int(holder[0]), 0))
        query = _LIVE_BY_SCOPE.get(self.room.scope, _CLIENTS)
        params = (self._scope_param,) if self.room.scope in _LIVE_BY_SCOPE else ()
        row = self._conn.execute(query, params).fetchone()
        departed = self._departed.update(held, self._clock())
        return Others(held, demand, priority, departed), int(row[0]) if row else 0

    def _claim_priority(self, others: Others, wants: int, budget: int) -> Others:
        """Take the priority for an item that needs more than the run's budget and no
        more than the room can give (one run at a time holds it), give it back once the
        item is through; returns ``others`` with the priority as it now stands."""
        # An item the room can serve with the priority, or one that waited too long for
        # its share to grow (it may then go past the share within the live room): only
        # the holder of the priority does, so two runs never do it at once.
        needed = budget < wants and (wants <= self._reachable or self._overdue)
        if self._priority and not needed:
            self._set_priority_amount(0)
            self._conn.execute("SELECT pg_advisory_unlock(%s, 0)", (self._priority_class,))
            self._priority = 0
        elif needed and not self._priority and others.priority is None:
            row = self._conn.execute(
                "SELECT pg_try_advisory_lock(%s, 0)", (self._priority_class,)
            ).fetchone()
            if row and row[0]:
                self._priority = -1  # held; its amount is set just below
        if self._priority and needed and self._priority != wants:
            self._set_priority_amount(wants)
        if self._priority:
            return Others(others.held, others.demand, (self._me, self._priority), others.departed)
        return others

    def _set_priority_amount(self, amount: int) -> None:
        """Publish how many connections the priority is for (a shared lock on that key)."""
        if self._priority > 0:
            self._conn.execute(
                "SELECT pg_advisory_unlock_shared(%s, %s)", (self._priority_class, self._priority)
            )
        if amount > 0:
            self._conn.execute(
                "SELECT pg_advisory_lock_shared(%s, %s)", (self._priority_class, amount)
            )
        self._priority = amount

    def _set_demand(self, demand: int) -> None:
        while self._demand_held < demand:
            self._conn.execute(
                "SELECT pg_advisory_lock_shared(%s, %s)", (self._demand_class, self._demand_held)
            )
            self._demand_held += 1
        while self._demand_held > demand:
            self._demand_held -= 1
            self._conn.execute(
                "SELECT pg_advisory_unlock_shared(%s, %s)", (self._demand_class, self._demand_held)
            )

    def _move_to(self, hold: int, others: Others) -> None:
        while len(self._slots) > hold:
            slot = self._slots.pop()
            self._conn.execute("SELECT pg_advisory_unlock(%s, %s)", (self._slot_class, slot))
        slot = 0
        taken = set(self._slots)
        while len(self._slots) < hold and slot < self.room.allows:
            if slot not in taken:
                row = self._conn.execute(
                    "SELECT pg_try_advisory_lock(%s, %s)", (self._slot_class, slot)
                ).fetchone()
                if row and row[0]:
                    self._slots.append(slot)
            slot += 1

    def summary(self) -> str | None:
        """One line for the summary: with whom the room was shared, and what it cost
        (None when no other run came)."""
        peers = self.peers_seen
        if not peers:
            return None
        return (
            f"shared the server's room with up to {peers} other run(s) (name space "
            f"{self.namespace!r}): budget down to {self.lowest} at times, held back "
            f"{self._held_back.seconds:.2f}s waiting for another run"
            + (
                f"; {self.gave_way} time(s) a test gave way after waiting "
                f"{self._growth_wait:g}s for the share to grow"
                if self.gave_way
                else ""
            )
            + (
                f"; {self.went_past} time(s) a test went past the share, within the room "
                "the server had free"
                if self.went_past
                else ""
            )
        )
