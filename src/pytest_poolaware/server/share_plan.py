"""The arithmetic of runs sharing one server's room: each run's fair share, one step of
a run towards its own, and the leases of runs just gone, still counted for a moment.

Pure: what the other runs hold and want is read elsewhere (``leases``, from ``pg_locks``)
and passed in, so every run computes the same split from the same view, and the tests
check it without a server. ``share.ShareCoordinator`` takes the steps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from pytest_poolaware.server.room import CLOSING_SLACK
from pytest_poolaware.shared.limits import Limits

#: Seconds the leases of a run that vanished (killed, cut off, or just ended) still count
#: as taken: its workers may be opening connections its controller granted just before,
#: which the server's live count does not show yet.
DEPARTED_GRACE: Final = 1.0
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
SHARE_PROTOCOL: Final = 2
#: A lock key: the protocol's version in the bits from this one up (at most 127, so the
#: key stays a non-negative int4), the number (a slot, a unit of demand, the priority's
#: amount) below it. Limits allow far fewer connections than 2**24.
VERSION_SHIFT: Final = 24
KEY_NUMBER_MASK: Final = (1 << VERSION_SHIFT) - 1
#: The number, in the priority's class, of the shared lock a run holds while a rerun of
#: its waits mid-test for a connection (since protocol 2): a rerun never gives way (it
#: has no third attempt), so such a run is served before any run whose waiting test is a
#: first attempt, which can give way. Never an amount: no limit allows that many.
RERUN_MARK: Final = KEY_NUMBER_MASK


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


def lock_classes(namespace: str, limit: str) -> tuple[int, int, int]:
    """Advisory-lock class ids (slots, demand, priority) of one name space and one
    binding limit: runs share only with runs that meet the same limit in the same name
    space. The same in every protocol version (the keys carry the version)."""
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
    #: Runs (backend pid) holding locks of another protocol version, and that version:
    #: not read as runs; their connections count as clients that take no part.
    foreign: Mapping[int, int] = field(default_factory=dict)
    #: Runs (backend pid) silent past ``STALLED_AFTER``, and the test leases they hold:
    #: not read as runs (neither their leases, demand nor priority are honoured).
    stalled: Mapping[int, int] = field(default_factory=dict)
    #: Runs (backend pid) a rerun of which waits mid-test for a connection (``RERUN_MARK``).
    reruns: frozenset[int] = frozenset()

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


def needs_priority(
    limits: Limits, wants: int, others: Others, overdue: bool, rerun_waits: bool
) -> bool:
    """Whether the run's waiting item (``wants`` connections, 0: none waits) needs the
    priority. An item the priority can serve, or one that waited too long for its
    share to grow (it may then go past the share within the live room): only the holder
    does, so two runs never do it at once. A rerun waiting mid-test for a connection
    goes first: it cannot give way, a first attempt can (and does, once the rerun's run
    holds the priority), so a run whose item is a first attempt lets go of it then."""
    if limits.budget >= wants:
        return False
    if rerun_waits:
        return True
    # Every other run with work keeps one connection (``shares_with_priority``): an item
    # the priority cannot serve then does not take it from one it can.
    servable = limits.ceiling - sum(1 for demand in others.demand.values() if demand > 0)
    return not others.reruns and (wants <= servable or overdue)


def served_elsewhere(others: Others, me: int, rerun_waits: bool) -> bool:
    """Whether another run is served first, so this run's blocked items give way and its
    reruns wait to start: it holds the priority, or a rerun of its waits mid-test (it
    cannot give way) while none of this run's does. The second holds from the first
    step that sees the rerun's mark, before that run can take the priority: a rerun
    started meanwhile would wait on it, neither able to give way."""
    if others.priority is not None and others.priority[0] != me:
        return True
    return bool(others.reruns) and not rerun_waits


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
) -> Plan:
    """One step towards this run's share.

    ``allows`` is what the binding limit allows in all; every run's own connection takes
    one slot of it. ``live_others`` counts the client connections in the limit's scope
    that are not this run's (its workers' nor its own). Others occupy the larger of what
    they lease and what is live, so lingering connections of a dead run, and clients that
    do not take part, are never leased out twice. A run above its share gives back what
    it does not use, and meanwhile starts nothing new above the share. ``workers``:
    the run's xdist workers (0: not known), for ``_slack``.
    """
    runs = len(others.held.keys() | others.demand.keys())
    # Every run leases a slot for its own connection first (``held`` counts it); one
    # that could not yet still has that connection open.
    others_leased = sum(others.held.values()) + others.slotless + others.departed
    outsiders = max(0, live_others - others_leased)
    slack = _slack(allows - 1 - runs - outsiders, others, outsiders, ceiling, workers)
    pool = allows - 1 - runs - outsiders - slack
    demands = {**{run: others.demand.get(run, 0) for run in others.held}, **others.demand}
    demands[me] = demand
    share = shares_with_priority(pool, demands, others.priority)[me]
    if not runs and demand:
        # Alone: the whole room (up to the run's own ceiling), not just what it asked
        # for the moment before.
        share = max(share, pool if ceiling is None else min(pool, ceiling))
    free = allows - 1 - slack - max(others_leased, live_others) - held
    # Below the share: take what is free. Above it: give back what is not in use.
    grow = held + max(0, min(max(share, in_use) - held, free))
    hold = grow if held < max(share, in_use) else max(share, min(held, in_use))
    if demand and held:
        hold = max(hold, 1)  # a run with work left never gives up its last lease
    budget = max(1, min(hold, share)) if demand else max(1, hold)
    return Plan(
        hold, budget, share, held_back=bool(runs) and share < demand, reachable=max(1, pool)
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
