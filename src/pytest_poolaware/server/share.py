"""Runs against one server share its room, coordinating through the server itself.

Each run holds slot leases: session-level advisory locks ``(slot class, n)`` taken on
the plugin's own connection, one per connection the run may open. A run publishes its
demand as shared locks ``(demand class, 0..demand-1)``. Every run reads the others'
leases and demands from ``pg_locks`` and the live connection count from
``pg_stat_activity``, and moves towards its share: a request for more than its budget
takes a ticket (``share_plan.Ticket``), the oldest is served first and whole, and the
rest of the room is divided by demand, max-min fair, so a run alone gets all of it.
Leases die with the session, so a run killed or cut off (TCP keepalives) frees its
share without anyone's help; since its workers' connections may outlive it for a
moment, a run never takes more than the live count leaves free.

``share_plan`` holds the arithmetic (pure), ``leases`` the locks and the look at the
others' (every SQL text is ``sql``'s); ``ShareCoordinator`` moves them in a background
thread, and the scheduler reads ``budget()`` before it grants.
"""

from __future__ import annotations

import bisect
import functools
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, Final

from pytest_poolaware.server.connection import connection_failure
from pytest_poolaware.server.leases import Leases
from pytest_poolaware.server.room import CLOSING_SLACK, ROLE, Room, ServerFacts
from pytest_poolaware.server.share_plan import (
    DEPARTED_GRACE,
    OUTSIDE_WINDOW,
    STALLED_AFTER,
    Others,
    Plan,
    Recent,
    kept_by_others,
    other_version_note,
    plan,
)
from pytest_poolaware.server.share_progress import HEAD_PATIENCE, HeadPatience, Progress
from pytest_poolaware.server.share_touch import Touch
from pytest_poolaware.shared.clock import monotonic, wall
from pytest_poolaware.shared.limits import Limits, RunUse

#: Seconds between two looks at the other runs: a share moves within about this long.
LEASE_INTERVAL: Final = 0.1
#: Seconds a run waits at the start for the others to make room for its first share.
START_WAIT: Final = 5.0
#: Seconds a run alone waits for connections of no run that hold the room an item needs
#: past its budget (a run just killed, whose workers still close theirs) before the item
#: goes past anyway: they may be clients that never leave. Well below the connect gate's
#: timeout, so that the wait ends here, on the run's terms.
GROWTH_WAIT: Final = 10.0


def share_growth_wait(gate_timeout: float) -> float:
    """How long a run alone waits for connections of no run to close: ``GROWTH_WAIT``,
    and at most half the connect gate's timeout."""
    return max(LEASE_INTERVAL, min(GROWTH_WAIT, gate_timeout / 2))


class HeldBack:
    """When a run was held back by other runs (below what it wanted): spans of
    ``time.time()``, which the scheduler compares with tests' start and end, and their
    total on the run's own clock. The sharing thread writes it, the scheduler reads it.
    """

    def __init__(self, clock: Callable[[], float], now: Callable[[], float] = wall) -> None:
        self._clock = clock
        self._now = now
        self._lock = threading.Lock()
        #: Seconds held below what the run wanted by other runs, and when that began.
        self.seconds = 0.0
        self._since: float | None = None
        self._tick = 0.0
        self._spans: list[tuple[float, float]] = []
        #: The test held back longest, and for how long (seconds): the summary names it.
        self.longest: tuple[str, float] | None = None
        #: The spans' ends, in order (they follow one another): ``within`` bisects them.
        self._ends: list[float] = []

    def during(self, start: float, end: float) -> bool:
        """Whether the run was held back between two ``time.time()``s."""
        with self._lock:
            spans = list(self._spans)
            ongoing = self._since
        if ongoing is not None and ongoing <= end:
            return True
        return any(begin <= end and start <= finish for begin, finish in spans)

    def within(self, waits: Iterable[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
        """The parts of a test's ``waits`` (``time.time()`` spans; its threads' may overlap,
        they count once) during which the run was held back, in order."""
        with self._lock:
            spans = list(self._spans)
            ends = list(self._ends)
            if self._since is not None:
                spans.append((self._since, math.inf))
                ends.append(math.inf)
        parts: list[tuple[float, float]] = []
        for start, end in union(waits):
            for begin, finish in spans[bisect.bisect_right(ends, start) :]:
                if begin >= end:
                    break
                if max(start, begin) < min(end, finish):
                    parts.append((max(start, begin), min(end, finish)))
        return tuple(parts)

    def charge(
        self, nodeid: str, waits: Iterable[tuple[float, float]]
    ) -> tuple[tuple[float, float], ...]:
        """The parts of a finished test's ``waits`` during which the run was held back
        (``within``); the longest such test is kept."""
        parts = self.within(waits)
        seconds = sum(end - start for start, end in parts)
        with self._lock:
            if seconds > 0 and (self.longest is None or seconds > self.longest[1]):
                self.longest = (nodeid, seconds)
        return parts

    def note(self, held_back: bool) -> None:
        """Whether the run is held back now: a span begins or ends."""
        now, tick = self._now(), self._clock()
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
        self._ends.append(now)
        self.seconds += max(0.0, tick - self._tick)
        self._since = None


def union(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of ``spans`` as disjoint (start, end) spans, in order."""
    joined: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if joined and start <= joined[-1][1]:
            joined[-1] = (joined[-1][0], max(joined[-1][1], end))
        elif start < end:
            joined.append((start, end))
    return joined


class GrowthWait:
    """How long a wait has lasted: past ``seconds`` it is overdue, and the run stops
    waiting (``ShareCoordinator``): a run alone whose room connections of no run hold
    stops waiting for them to close."""

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self._clock = clock
        self._since = 0.0
        #: The wait going on has lasted ``seconds`` (as of the last step).
        self.overdue = False

    def update(self, waiting: bool) -> bool:
        """Whether the wait going on now is overdue; a wait ends once nothing waits."""
        if waiting:
            self._since = self._since or self._clock()
            self.overdue = self._clock() - self._since > self.seconds
        else:
            self._since = 0.0
            self.overdue = False
        return self.overdue


def leases_on(
    namespace: str,
    facts: ServerFacts,
    room: Room,
    clock: Callable[[], float],
    *,
    grace: float,
    stalled_after: float,
) -> Callable[[Any], Leases]:
    """How a run takes its leases on a connection (first, or again after losing touch):
    ``grace`` for departed runs, and the silence after which a run is stalled."""
    return functools.partial(
        Leases,
        namespace=namespace,
        room=room,
        scope_name=facts.role if room.scope == ROLE else facts.database,
        clock=clock,
        departed_grace=grace,
        stalled_after=stalled_after,
    )


class ShareCoordinator:
    """This run's leases on the plugin's own connection, kept moving towards its share.

    The scheduler tells it what the run uses and wants (``report``) and reads the budget
    (``budget``) before it grants; ``on_change`` wakes the scheduler when that moves.
    When the connection fails, the run holds itself to a budget safe whatever the others
    do (``share_plan.SafeBudget``) and rejoins on a new connection (``reconnect``, a few
    tries); if it cannot, sharing ends with a ``problem`` note, the safe budget stays.
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
        reconnect: Callable[[], Any] | None = None,
        workers: int = 0,
        stalled_after: float = STALLED_AFTER,
    ) -> None:
        self._conn = connection
        #: The run's xdist workers (0: not known): alone, the slot kept for a run that
        #: arrives never leaves them fewer connections than one each (``share_plan``).
        self._workers = workers
        #: Alone, connections of no run hold part of the room (``_follow``).
        self._crowded = GrowthWait(growth_wait, clock)
        #: At the head of the queue with leases not growing (``HEAD_PATIENCE``).
        self.patience = HeadPatience(HEAD_PATIENCE, clock)
        self.namespace = namespace
        self.room = room
        self.ceiling = ceiling
        #: The ceiling the room itself allows: ``cap`` never raises the budget above it.
        self._room_ceiling = ceiling
        self._on_change = on_change
        self._interval = interval
        self._clock = clock
        #: Leases on a connection: the run's first, or again after losing touch.
        self._join = leases_on(
            namespace, facts, room, clock, grace=departed_grace, stalled_after=stalled_after
        )
        #: The no-progress rule: this run's steps, and stalls seen.
        self.progress = Progress(stalled_after, clock)
        self._leases = self._join(connection)
        self._lock = threading.Lock()
        self._share = self._demand = ceiling
        #: What the scheduler reads (``limits``): until the first step, the run's own
        #: budget (what it would use with sharing off).
        self._limits = Limits(ceiling)
        #: Connections an item held back by the budget expects, whether a test waits
        #: mid-test for a connection, and whether that is a rerun (``report``).
        self._wants, self._rerun_waits = 0, False
        self._stuck: int | None = None
        #: This run's test waiting mid-test gives way to an older one (``gives_way``).
        self._yield = False
        #: Connections in the limit's scope that are not this run's tests' right now:
        #: other clients', and what the other runs may open without asking anyone.
        self._occupied = 0
        #: Live connections not this run's, at their highest and lowest of late
        #: (``OUTSIDE_WINDOW``).
        self._outside = Recent(OUTSIDE_WINDOW)
        #: Times a test of this run gave way to an older one of another run.
        self.gave_way = 0
        self._in_use = self._open = self._committed = self.peers_seen = 0
        #: Notes of runs met that speak another sharing protocol (one a version).
        self.other_versions: dict[int, str] = {}
        #: When other runs held this one back, and its tests' waits they caused.
        self.held_back = HeldBack(clock)
        self.lowest = ceiling
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: In touch with the other runs, or holding itself safe until it rejoins.
        self.touch = Touch(reconnect, self._stop, clock)

    @property
    def problem(self) -> str | None:
        """Why sharing stopped for good (None: it did not)."""
        return self.touch.problem

    @property
    def interruptions(self) -> list[str]:
        """Notes of each time the run lost touch with the others and rejoined."""
        return [*self.touch.interruptions, *self.progress.notes]

    # -- what the scheduler calls ------------------------------------------------------------

    def budget(self) -> int:
        with self._lock:
            return self._limits.budget

    def limits(self) -> Limits:
        """What the planner follows: the budget (0: the head of the ticket queue, another
        run's, needs this run's room); what it may still grow to (the room less what
        cannot be had: the other runs' own connections, clients that take no part);
        whether this run's test waiting mid-test gives way (wait-die across runs, by
        ticket age); and whether an item may go past the budget (``_follow``)."""
        with self._lock:
            limits = self._limits
            if self.progress.silent():
                # No step for longer than the others wait (suspended, wedged): they no
                # longer honour its leases, so nothing new starts until the next step.
                held = min(limits.budget, self._committed)
                return Limits(held, held, limits.give_way, may_pass=False)
            return limits

    def cap(self, ceiling: int) -> None:
        """Another login of the run's tests allows less than the room shared: the run's
        budget never goes above ``ceiling`` from now on (a later call may raise it again,
        never above the room shared: that login was read to allow more once connections
        counted as other clients' proved to be the run's own). Leases still follow the
        shared room's limit (the first login's), so runs binding on the other login's
        limit do not coordinate on it (``docs/design.md``, "Several logins")."""
        with self._lock:
            self.ceiling = min(self._room_ceiling, ceiling)
            now = self._limits
            budget, reachable = min(now.budget, self.ceiling), min(now.ceiling, self.ceiling)
            self._limits = replace(now, budget=budget, ceiling=reachable)
        self._on_change()

    def report(self, use: RunUse) -> None:
        """What the run uses and waits for: leases never fall below ``use.using``."""
        with self._lock:
            self._rerun_waits, self._stuck, in_use = use.rerun_waits, use.stuck, use.in_use
            self._in_use, self._committed = max(in_use, use.using), in_use
            self._open = use.open
            # Demand: what it holds, and room for the item it waits to start (or one
            # more connection when nothing waits), as long as it has work left.
            wanted = in_use + max(use.wants, 1)
            self._demand = min(self.ceiling, wanted) if use.pending else in_use
            self._wants = use.wants
            if self.touch.safe is not None:  # out of touch: down as tests end, never up
                safe = min(self.ceiling, self.touch.safe.follow(in_use))
                self._limits = replace(self._limits, budget=safe, ceiling=safe)
                self.lowest = min(self.lowest, safe)

    def held_back_during(self, start: float, end: float) -> bool:
        """Whether the run was held back by another run between two ``time.time()``s."""
        return self.held_back.during(start, end)

    def held_back_waits(
        self, nodeid: str, waits: Iterable[tuple[float, float]]
    ) -> tuple[tuple[float, float], ...]:
        """``HeldBack.charge``: the parts of a finished test's waits another run caused."""
        return self.held_back.charge(nodeid, waits)

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> int:
        """Take a first share (waiting a little for others to make room), then keep it
        moving in the background; returns the starting budget."""
        deadline = self._clock() + START_WAIT
        while self.step() and self.budget() < self.ceiling and self._clock() < deadline:
            if self._share <= self._leases.slots or self._stop.wait(self._interval):
                break
        if self.problem is None:
            self._thread = threading.Thread(target=self._run, name="poolaware-share", daemon=True)
            self._thread.start()
        return self.budget()

    def stop(self) -> None:
        """Stop moving; the leases go with the connection, which its owner closes (or
        this, when it opened one of its own to rejoin)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self.held_back.close(wall())
        self.touch.stopped()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if not self.touch.lost:
                self.step()
            elif not self.rejoin():
                return

    def rejoin(self) -> bool:
        """Take leases again on a new connection (``Touch.rejoin``: the safe budget
        holds meanwhile); False once sharing has stopped for good."""
        leases = self.touch.rejoin(self._join)
        if leases is None:
            return False
        leases.remember(self._leases)
        self._conn, self._leases = self.touch.connection, leases
        if self.step():
            self.touch.in_touch()
        return True

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> bool:
        """Look at the others and move this run's leases; False when out of touch."""
        if self.touch.lost:
            return False
        try:
            self.progress.resuming(self._leases, self._committed)
            others, step, wants, open_ = self._move()
        except Exception as exc:
            self._lose(exc)
            return False
        # Not when stopped mid-step (SIGSTOP lands anywhere): ``Progress.stepped``.
        if self.progress.stepped():
            self._follow(others, step, wants, open_)
        return True

    def _move(self) -> tuple[Others, Plan, int, int]:
        """Look at the other runs, plan a step and move the leases to it; returns what
        was seen and planned, and the item's want and the connections open it met. The
        run's ticket is taken or given back first, so that it looks at the queue as it
        now stands."""
        with self._lock:
            demand, in_use, open_ = self._demand, self._in_use, self._open
            wants, budget, stuck = self._wants, self._limits.budget, self._stuck
            rerun_waits, committed = self._rerun_waits, self._committed
        amount = requested(budget, committed, wants, stuck=stuck is not None)
        amount = self.patience.asked(amount, more_than_any=self.room.allows)
        self._leases.request(amount, stuck=stuck, rerun=rerun_waits)
        others, live = self._leases.look()
        self.progress.saw(others)
        outside, steady = self._outside.update(max(0, live - open_), self._clock())
        step = plan(
            me=self._leases.me,
            allows=self.room.allows,
            held=max(0, self._leases.slots - 1),
            demand=demand,
            in_use=in_use,
            others=others,
            live_others=outside,
            steady_others=steady,
            ceiling=self.ceiling,
            workers=self._workers,
        )
        self._leases.set_demand(demand)
        self._occupied = max(outside, kept_by_others(others))
        # One slot more than the tests': the plugin's own connection takes one too,
        # so that all runs' slot locks together never exceed what the limit allows.
        self._leases.move_to(step.hold + 1)
        return others, step, wants, open_

    def _lose(self, exc: BaseException) -> None:
        """The connection failed: its leases are gone with it, so the others may hand
        them out. Until it rejoins, the run holds itself to what it held, falling to its
        even part of the room as its tests end (``SafeBudget``)."""
        cause = connection_failure(self._conn, exc)
        self.progress.forget()
        with self._lock:
            held = min(self._limits.budget, max(1, self._leases.slots - 1))
            safe = self.touch.lose(cause, held=held, allows=self.room.allows)
            self._limits = Limits(min(self.ceiling, safe.follow(self._in_use)))
            self.lowest = min(self.lowest, self._limits.budget)
            self._yield = False
        self.held_back.note(False)
        self._on_change()

    def _follow(self, others: Others, step: Plan, wants: int, open_: int) -> None:
        """Make the step the run's budget, and decide how a wait for more ends."""
        runs = len(others.held.keys() | others.demand.keys())
        self.peers_seen = max(self.peers_seen, runs)
        self.other_versions.update({v: other_version_note(v) for v in others.foreign.values()})
        self.touch.runs_seen = runs + 1
        self._share = step.share
        self.patience.step(step.head == self._leases.me, self._leases.slots)
        budget = max(0, min(step.budget, self._leases.slots - 1, self.ceiling))
        # Held back by another run: a test waits for room, and the run has less than it
        # would have alone.
        self.held_back.note(step.held_back and wants > budget and budget < self.ceiling)
        reachable = min(self.ceiling, step.reachable)
        # Alone, past the budget (the planner's last resort) as before sharing, unless
        # connections of no run hold the room it needs: they may be a killed run's,
        # closing, so they have the growth wait to go, counted from when the run found
        # itself alone with them (they may also be clients that never leave). With
        # other runs, nothing goes past the budget: a request waits for its ticket.
        after = max(open_, budget) + wants - budget
        live_free = self.room.allows - 1 - CLOSING_SLACK - self._occupied
        crowded = not runs and bool(self._occupied) and after > live_free
        waited_out = self._crowded.update(crowded)
        may_pass = not runs and (not crowded or waited_out)
        limits = Limits(budget, reachable, step.give_way, may_pass)
        self._publish(limits, yield_=step.give_way)

    def _publish(self, limits: Limits, *, yield_: bool) -> None:
        """What the scheduler reads, in one go; it is woken when that changed."""
        with self._lock:
            changed = limits != self._limits
            if yield_ and not self._yield:
                self.gave_way += 1
            self._limits, self._yield = limits, yield_
            self.lowest = min(self.lowest, limits.budget)
        if changed:
            self._on_change()


def requested(budget: int, committed: int, wants: int, *, stuck: bool) -> int:
    """The test leases a run asks for with a ticket (0: none): an item that needs
    more than the budget, or, with the budget in use, one more connection for a test
    waiting mid-test (``stuck``), which holds others meanwhile."""
    item = wants if wants > budget else 0
    more = committed + 1 if stuck and committed + 1 > budget else 0
    return max(item, more)


def share_summary(share: ShareCoordinator) -> str | None:
    """One line for the summary: with whom the room was shared, and what it cost
    (None when no other run came)."""
    held_back = share.held_back
    return summary_line(share, held_back.seconds, held_back.longest)


def summary_line(
    share: ShareCoordinator, held_back: float, longest: tuple[str, float] | None = None
) -> str | None:
    """``ShareCoordinator.summary``: the run's sharing in one line, with the test held
    back longest (``longest``: its node id and seconds)."""
    if not share.peers_seen:
        return None
    return (
        f"shared the server's room with up to {share.peers_seen} other run(s) (name space "
        f"{share.namespace!r}): budget down to {share.lowest} at times, held back "
        f"{held_back:.2f}s waiting for another run"
        + (f" (longest: {longest[0]} {longest[1]:.2f}s)" if longest else "")
        + (
            f"; {share.gave_way} time(s) a test gave way to an older one of another run, "
            "both waiting mid-test for a connection"
            if share.gave_way
            else ""
        )
        + (
            f"; {share.patience.times} time(s) a request first in line stopped holding "
            f"the other runs back after {HEAD_PATIENCE:g}s without their room coming back "
            "(connections they keep open between tests)"
            if share.patience.times
            else ""
        )
    )
