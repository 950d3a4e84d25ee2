"""The arithmetic of runs sharing one server's room: the ticket queue (requests for
more leases served in the order they were made, wait-die by their age), each run's
fair share of the rest, one step of a run towards its own, and the leases of runs just
gone, still counted for a moment.

Pure: what the other runs hold and want is read elsewhere (``leases``, from ``pg_locks``)
and passed in, so every run computes the same split from the same view, and the tests
check it without a server. ``share.ShareCoordinator`` takes the steps.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from pytest_poolaware.server.room import CLOSING_SLACK

#: Seconds the leases of a run that vanished (killed, cut off, or just ended) still count
#: as taken: its workers may be opening connections its controller granted just before,
#: which the server's live count does not show yet.
DEPARTED_GRACE: Final = 1.0
#: Seconds over which the count of live connections that are not this run's is taken
#: at its highest: the server ends a connection a worker closes before the worker's
#: count reaches the controller, so for that moment the server's count less the run's
#: own reads too low (a test of 8 ended, and a run let its budget grow into another
#: run's open connections: the server refused one). A few steps: every step of it
#: delays taking room that really came free.
OUTSIDE_WINDOW: Final = 0.15
#: Seconds a run's coordinating connection may go without a query (a run in touch runs
#: some every ``share.LEASE_INTERVAL``) before the other runs stop honouring its leases:
#: it is suspended (SIGSTOP, Ctrl-Z) or wedged, and its session, so its locks, live on.
#: Its open connections still count, as a client's that takes no part.
STALLED_AFTER: Final = 10.0


#: The sharing protocol's version: what the advisory locks mean and how runs read them.
#: Every lock key carries it (``lock_key``), so runs of plugin versions that speak
#: another protocol never read each other's locks as their own: each counts the other's
#: connections as a client's that takes no part. Raise it with any change to the locks'
#: meaning. The class ids (``lock_classes``) and the version's place in a key never
#: change: that is how a run sees another version's locks at all.
SHARE_PROTOCOL: Final = 3
#: A lock key: the protocol's version in the bits from this one up (at most 127, so the
#: key stays a non-negative int4), the number (a slot, a unit of demand, the priority's
#: amount) below it. Limits allow far fewer connections than 2**24.
VERSION_SHIFT: Final = 24
KEY_NUMBER_MASK: Final = (1 << VERSION_SHIFT) - 1
#: The number, in the priority's class, of the shared lock a run holds while a rerun of
#: its waits mid-test for a connection (since protocol 2): a rerun never gives way (it
#: has no third attempt), so its ticket is served before any first attempt's. Never an
#: amount: no limit allows that many.
RERUN_MARK: Final = KEY_NUMBER_MASK
#: The number, in the priority's class, of the shared lock a run holds while a test of
#: its waits mid-test for a connection, holding others (since protocol 3): only such
#: tests can wait on each other across runs (``gives_way``).
STUCK_MARK: Final = KEY_NUMBER_MASK - 1
#: A ticket's stamp: the server's clock in milliseconds, modulo this (about 4.6 hours).
#: Two tickets compare by their difference modulo it (``older``), so the order holds as
#: long as no request waits for half of that (a worker waits for its go far less).
TICKET_MODULUS: Final = 1 << VERSION_SHIFT


def lock_key(number: int, version: int = SHARE_PROTOCOL) -> int:
    """The key of lock ``number`` (a slot, a unit of demand, an amount) in ``version``."""
    if not 0 <= number <= KEY_NUMBER_MASK:
        raise ValueError(f"lock number {number} out of range")
    return version << VERSION_SHIFT | number


def key_parts(key: int) -> tuple[int, int]:
    """A lock key's protocol version and number (``lock_key`` undone)."""
    return key >> VERSION_SHIFT, key & KEY_NUMBER_MASK


def other_version_note(version: int) -> str:
    """The note of a run that met locks of another protocol version (once a version)."""
    return (
        f"another run uses sharing protocol v{version}: a pytest-poolaware release that "
        f"cannot read this one's leases (v{SHARE_PROTOCOL}), nor this one its; this run "
        "counts its connections as another client's, so the runs do not split the room "
        "by demand (use one plugin version on a shared server)"
    )


def lock_classes(namespace: str, limit: str) -> tuple[int, int, int, int]:
    """Advisory-lock class ids (slots, demand, priority, tickets) of one name space and
    one binding limit: runs share only with runs that meet the same limit in the same
    name space. The same in every protocol version (the keys carry the version); the
    tickets' class came with protocol 3, from a digest of its own so that the first
    three stay what they were."""
    key = f"{namespace}\0{limit}".encode()
    digest = hashlib.blake2b(key, digest_size=12).digest()
    mask = 0x7FFFFFFF  # non-negative: pg_locks shows the keys as oid
    slot, demand, priority = (
        int.from_bytes(digest[i : i + 4], "big") & mask for i in range(0, 12, 4)
    )
    tickets = int.from_bytes(hashlib.blake2b(key + b"\0tickets", digest_size=4).digest(), "big")
    return slot, demand, priority, tickets & mask


@dataclass(frozen=True)
class Ticket:
    """One run's request for more leases: it waits for room its leases do not cover."""

    run: int
    #: When the request was made, on the server's clock (``TICKET_MODULUS``).
    stamp: int
    #: The test leases the request asks to be served first: the need of an item waiting
    #: to start, or what the run's tests hold and one more for a test waiting mid-test.
    amount: int
    #: A test of the run holds connections and waits mid-test for one more.
    stuck: bool = False
    #: That test is a rerun: it cannot give way (no third attempt).
    rerun: bool = False


def older(first: int, second: int) -> bool:
    """Whether stamp ``first`` was taken before ``second`` (modulo ``TICKET_MODULUS``)."""
    return 0 < (second - first) % TICKET_MODULUS < TICKET_MODULUS // 2


def ticket_order(tickets: Iterable[Ticket]) -> tuple[Ticket, ...]:
    """Tickets in the order they are served, the same in every run: a rerun's waiting
    mid-test first (it cannot give way), then other tests waiting mid-test (they hold
    connections: served, they end and free them; behind a test waiting to start, whose
    run takes their runs' shares, they could only wait), then the rest; the oldest
    first within each, then by run."""

    def compare(a: Ticket, b: Ticket) -> int:
        if (a.rerun, a.stuck) != (b.rerun, b.stuck):
            return -1 if (a.rerun, a.stuck) > (b.rerun, b.stuck) else 1
        if a.stamp != b.stamp:
            return -1 if older(a.stamp, b.stamp) else 1
        return (a.run > b.run) - (a.run < b.run)

    return tuple(sorted(tickets, key=functools.cmp_to_key(compare)))


def gives_way(me: int, queue: tuple[Ticket, ...], leases: Mapping[int, int], pool: int) -> bool:
    """Wait-die across runs, decided by ticket age, the same in every run: this run's
    test waiting mid-test gives way (it fails on a connection-limit error and is rerun
    alone) when it is the youngest such test, the head of the queue is another run's
    test waiting mid-test too, and the head cannot be served without it: the room free
    and the leases of the runs with no test waiting mid-test (they give them back as
    their tests end, the head being served first) fall short of what the head lacks.
    ``leases``: every run's test leases (this one's included); ``pool``: the room the
    runs' tests share. Tests waiting mid-test go first in the queue, so a head waiting
    to start means none does: it waits for tests to end. A rerun never gives way."""
    stuck = [ticket for ticket in queue if ticket.stuck]
    if not stuck or stuck[0] is not queue[0] or stuck[0].run == me:
        return False
    youngest = next((ticket for ticket in reversed(stuck) if not ticket.rerun), None)
    if youngest is None or youngest.run != me:
        return False
    head = queue[0]
    lacks = head.amount - leases.get(head.run, 0)
    free = pool - sum(leases.values())
    blocked = {ticket.run for ticket in stuck}
    releasable = sum(n for run, n in leases.items() if run not in blocked)
    return lacks > max(0, free) + releasable


def shares_with_priority(
    total: int,
    demands: Mapping[int, int],
    priority: tuple[int, int] | None,
    kept: Mapping[int, int] | None = None,
) -> dict[int, int]:
    """``fair_shares``, but the run at the head of the ticket queue (run id, leases) gets
    that many first: its request is served before the shares are evened out again, the
    others sharing the rest, down to none when it needs the whole room. ``kept``: the
    leases of other runs whose test waits mid-test, which they cannot give back without
    it giving way: their shares never count on them (the head waits for the others')."""
    if priority is None or priority[0] not in demands:
        return fair_shares(total, demands)
    run, amount = priority
    first = max(0, min(amount, total, demands[run]))
    others = {other: demand for other, demand in demands.items() if other != run}
    floors = {other: min((kept or {}).get(other, 0), demand) for other, demand in others.items()}
    rest = fair_shares(
        total - first - sum(floors.values()),
        {other: demand - floors[other] for other, demand in others.items()},
    )
    shares = {other: floors[other] + rest[other] for other in others}
    shares[run] = max(0, min(demands[run], total - sum(shares.values())))
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
    #: The ticket queue, in the order it is served (``ticket_order``): every run's
    #: request for more leases, this one's included.
    queue: tuple[Ticket, ...] = ()
    #: Test leases of runs that vanished less than ``DEPARTED_GRACE`` ago: still taken.
    departed: int = 0
    #: Runs (backend pid) holding locks of another protocol version, and that version:
    #: not read as runs; their connections count as clients that take no part.
    foreign: Mapping[int, int] = field(default_factory=dict)
    #: Runs (backend pid) silent past ``STALLED_AFTER``, and the test leases they hold:
    #: not read as runs (neither their leases, demand nor tickets are honoured).
    stalled: Mapping[int, int] = field(default_factory=dict)

    @property
    def slotless(self) -> int:
        """Runs with a demand but no slot yet: each still has its own connection open."""
        return sum(1 for run in self.demand if not self.held.get(run))


class Recent:
    """The highest and the lowest of the values seen within ``window`` seconds
    (``OUTSIDE_WINDOW``)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._seen: list[tuple[float, int]] = []

    def update(self, value: int, now: float) -> tuple[int, int]:
        self._seen = [(at, seen) for at, seen in self._seen if now - at < self.window]
        self._seen.append((now, value))
        values = [seen for _, seen in self._seen]
        return max(values), min(values)


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


@dataclass(frozen=True)
class Plan:
    #: Leases to hold once this step is done, and the budget the planner may use now.
    hold: int
    budget: int
    #: The run's fair share, and whether it is held below what it wants by other runs.
    share: int
    held_back: bool
    #: The most this run could get at the head of the queue: the room less the other
    #: runs' own connections and the clients that take no part.
    reachable: int
    #: This run's test waiting mid-test gives way to an older one (``gives_way``).
    give_way: bool = False
    #: The run served first (None: no request the room can serve waits).
    head: int | None = None


def kept_by_others(others: Others) -> int:
    """Slots the other runs may fill at any moment, live now or not: each one's own
    connection, its leases beyond its last one, and a departed run's leases. A run alone
    but for connections of no run lets an item past its budget only into the rest."""
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
    workers: int = 0,
    steady_others: int | None = None,
) -> Plan:
    """One step towards this run's share.

    ``allows`` is what the binding limit allows in all; every run's own connection takes
    one slot of it. ``live_others`` counts the client connections in the limit's scope
    that are not this run's (its workers' nor its own). Others occupy the larger of what
    they lease and what is live, so lingering connections of a dead run, and clients that
    do not take part, are never leased out twice. A run above its share gives back what
    it does not use, and meanwhile starts nothing new above the share. ``workers``:
    the run's xdist workers (0: not known), for ``_slack``. ``steady_others``: those
    connections at their lowest of late (default ``live_others``): the room shared
    out counts only clients that stay, not a run's connections closing a moment after
    it gave their leases back (the head of the queue would flicker in and out of
    reach); what a run takes is bounded by ``live_others`` all the same.
    """
    runs = len(others.held.keys() | others.demand.keys())
    # Every run leases a slot for its own connection first (``held`` counts it); one
    # that could not yet still has that connection open.
    others_leased = sum(others.held.values()) + others.slotless + others.departed
    steady = live_others if steady_others is None else min(steady_others, live_others)
    outsiders = max(0, steady - others_leased)
    slack = _slack(allows - 1 - runs - outsiders, others, outsiders, ceiling, workers)
    pool = allows - 1 - runs - outsiders - slack
    demands = {**{run: others.demand.get(run, 0) for run in others.held}, **others.demand}
    demands[me] = demand
    leases = {run: max(0, slots - 1) for run, slots in others.held.items()}
    leases[me] = held
    # A request for more than the room while other runs are there waits for them to
    # end, without holding them back meanwhile: served first, it would stop them all.
    queue = tuple(ticket for ticket in others.queue if ticket.amount <= pool)
    kept = {ticket.run: leases.get(ticket.run, 0) for ticket in queue if ticket.stuck}
    head = (queue[0].run, queue[0].amount) if queue else None
    share = shares_with_priority(pool, demands, head, kept)[me]
    if not runs and demand:
        # Alone: the whole room (up to the run's own ceiling), not just what it asked
        # for the moment before.
        share = max(share, pool if ceiling is None else min(pool, ceiling))
    free = allows - 1 - slack - max(others_leased, live_others) - held
    # Below the share: take what is free. Above it: give back what is not in use.
    grow = held + max(0, min(max(share, in_use) - held, free))
    hold = grow if held < max(share, in_use) else max(share, min(held, in_use))
    if demand and held and share:
        hold = max(hold, 1)  # a run with work left keeps its last lease, unless the
        # head of the queue needs it: it then starts nothing (a budget of 0)
    budget = min(hold, share) if demand else max(1, hold)
    give_way = gives_way(me, queue, leases, pool)
    return Plan(
        hold,
        budget,
        share,
        held_back=bool(runs) and share < demand,
        reachable=max(1, pool),
        give_way=give_way,
        head=queue[0].run if queue else None,
    )


def _slack(pool: int, others: Others, outsiders: int, ceiling: int | None, workers: int) -> int:
    """The slot kept free in a ``pool`` of the room (``CLOSING_SLACK``): for connections
    others have closed and the server still counts, when there are others (the run's own
    workers count theirs until the slot is free); and, alone, for a run that arrives
    (its own connection needs a slot to join), unless that would leave the tests fewer
    connections than the workers need to run one test each (a role allowing 3 at
    ``-n 4``: the slot would be half of what the tests get, as it never is unshared)."""
    if others.held or others.demand or others.departed or outsiders:
        return CLOSING_SLACK
    wanted = workers if ceiling is None else min(workers, ceiling)
    return CLOSING_SLACK if pool - CLOSING_SLACK >= wanted else 0


class SafeBudget:
    """The budget of a run that lost touch with the others (its coordinating connection
    dropped): safe whatever they do. Its leases died with its session, so the others may
    hand its slots out, but never the ones its open connections fill (they count the
    server's live connections). So the run keeps at most what it held, and no more than it
    uses beyond its even part of the room: the budget falls, as its tests end, to the room
    divided by the runs it last saw (each run's own connection and the closing slot
    left out), and never rises until the run has rejoined.
    """

    def __init__(self, *, held: int, allows: int, runs: int) -> None:
        runs = max(1, runs)
        #: The run's even part of the room among the runs it last saw.
        self.floor = max(1, (allows - runs - CLOSING_SLACK) // runs)
        #: Never more than the run held when it lost touch.
        self.held = self.budget = max(1, held)

    def follow(self, in_use: int) -> int:
        """The budget once the run holds ``in_use`` committed: down to what it uses, but
        never below its even part; never up."""
        self.budget = max(1, min(self.budget, max(self.floor, in_use)))
        return self.budget
