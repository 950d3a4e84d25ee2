"""What admission knows of each worker: its queue, what it holds, what it was granted
and what it waits for (``admission`` decides; this is its bookkeeping).

Pure logic with no xdist or database imports. Requests name their item, and a worker runs
its queue in order, so what a late completion or a later item's request means for the
grants is worked out here (``docs/design.md``, "Protocol", "Ordering").
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

W = TypeVar("W", bound=Hashable)


class RequestKind(enum.Enum):
    #: One more connection, mid-test.
    CONNECT = "connect"
    #: Room to rerun a test that hit the server's limit (never refused).
    RERUN = "rerun"


@dataclass
class Request:
    """A worker blocked until it may hold one more connection, or room to rerun."""

    worker: Hashable
    request: int
    order: int
    kind: RequestKind
    #: For a rerun: the room it asks for (a connect request wants one more than held).
    want: int = 0
    #: The item asking (None: not known, or asked outside any item).
    item: int | None = None
    #: Opened by a pool in its own thread or task: delayed until there is room, never
    #: refused (the test would only see the pool time out).
    background: bool = False


@dataclass
class Holder:
    """One worker as admission sees it: what it may start, holds and waits for."""

    order: int
    #: Items handed to it and not completed yet, in run order.
    queue: deque[int] = field(default_factory=deque)
    granted: int = 0  # length of the go'ed prefix of ``queue``
    #: Expected needs of the go'ed items, counted (kept up to date: hot path).
    granted_needs: Counter[int] = field(default_factory=Counter)
    #: Go'ed items whose rerun was granted other room than their go: item -> (the need
    #: it was go'ed with, that room), counted in ``granted_needs`` in place of the need.
    regranted: dict[int, tuple[int, int]] = field(default_factory=dict)
    open: int = 0
    idle: int = 0
    #: Connections granted to the running item: it may hold this many until it ends.
    floor: int = 0
    #: Connect requests granted whose connection has not shown up in ``open`` yet.
    connecting: int = 0
    #: Those of them granted to no item (the worker had none: its session start, say):
    #: they hold room until their connection is counted; from then on the worker holds
    #: what its counts say, and a connection it closes gives its room back at once
    #: rather than when a test of its ends (it may have none for a while).
    loose: int = 0
    #: The item ``floor`` and ``connecting`` were granted to. A worker may start its next
    #: item, and be granted connections for it, before the controller hears that the
    #: previous one completed: that completion must not wipe the newer grants.
    floor_item: int | None = None
    #: ``version`` of the last counts taken; older ones arriving late are ignored.
    version: int = -1
    #: Blocked requests, oldest first (threads of one test may each wait for one).
    requests: list[Request] = field(default_factory=list)
    release_sent: bool = False
    #: Idle connections left after the worker last tried to release them (held by pools
    #: with connections checked out): not worth asking for again until an item ends.
    stuck_idle: int = 0
    #: Its running item is a rerun: its connects are never refused (no third attempt).
    rerunning: bool = False
    #: When its head item was first found not to fit (0: not waiting); oldest go first.
    waiting_since: int = 0
    #: Goes other workers had, within connections they already held, while its head
    #: waited (``admission.HANDOVER_AFTER_GOES``).
    overtaken: int = 0

    def commitment(self) -> int:
        if any(r.kind is RequestKind.RERUN for r in self.requests):
            return self.open  # it starts nothing before its rerun is granted
        return max(self.open + self.loose, self.floor, self.granted_need())

    def granted_need(self) -> int:
        """The largest expected need among the go'ed items."""
        return max(self.granted_needs, default=0)

    def start(self, need: int) -> None:
        """Its next queued item gets its go."""
        self.granted += 1
        self.granted_needs[need] += 1

    def take_counts(self, open_: int, idle: int, released: bool, version: int | None) -> bool:
        """See ``Admission.counts``."""
        stale = version is not None and version <= self.version
        if not stale:
            self.version = self.version if version is None else version
            if open_ > self.open:
                self.connecting = max(0, self.connecting - (open_ - self.open))
                self.loose = max(0, self.loose - (open_ - self.open))
            self.open, self.idle = open_, idle
        if released:
            # The answer to a Release counts even when its numbers are not news: the
            # deadlock check waits for it.
            self.release_sent = False
            self.stuck_idle = self.idle
        elif stale:
            return False
        return True

    def counts_changed(self, open_: int, idle: int, version: int | None) -> bool:
        if version is not None and version <= self.version:
            return False
        return (self.open, self.idle) != (open_, idle)

    def regrant(self, index: int, expected: int, room: int) -> None:
        """The rerun of go'ed item ``index`` (go'ed with ``expected``) was granted ``room``:
        that is its reservation now. The first attempt's go may date from a larger budget
        (sharing the server, another run's share grew since), which its rerun must not take
        back: the other run may hold that room by now."""
        if index not in itertools.islice(self.queue, self.granted):
            return
        self._unregrant(index)
        self._uncount(expected)
        self.granted_needs[room] += 1
        self.regranted[index] = (expected, room)

    def _unregrant(self, index: int) -> None:
        """Count ``index`` with the need it was go'ed with again."""
        if index in self.regranted:
            expected, room = self.regranted.pop(index)
            self._uncount(room)
            self.granted_needs[expected] += 1

    def _uncount(self, need: int) -> None:
        self.granted_needs[need] -= 1
        if not self.granted_needs[need]:
            del self.granted_needs[need]

    def complete(self, index: int, expected: int) -> None:
        """An item ended (``expected``: the need it was go'ed with)."""
        self._unregrant(index)
        if self.queue.index(index) < self.granted:
            self.granted -= 1
            self._uncount(expected)
        self.queue.remove(index)
        if self.requests:
            # A request left unanswered (its wait timed out) is void once its item is over.
            self.requests = self.outliving({index})
        if self.floor_item not in self.queue:
            # What was granted belonged to this item (or to none still queued): free it.
            # Grants to a later item that already started stay until that one completes.
            self.free_grants()
        self.stuck_idle = 0

    def start_alone(self, need: int) -> None:
        """Its head item gets its go past the budget, as the only go'ed item (nothing
        else can free room for it)."""
        self.granted = 1
        self.waiting_since = self.overtaken = 0
        self.granted_needs = Counter({need: 1})
        self.regranted.clear()

    def answer(self, request: Request, *, refused: bool) -> None:
        """A request of its own is answered: unless refused, what it asked for is granted
        to its item until that item ends (a connect granted to no item holds its room
        until its connection is counted: ``loose``)."""
        if not refused and request.item is None and request.kind is RequestKind.CONNECT:
            self.loose += 1
            self.connecting += 1
        elif not refused:
            if not self.queued_before(self.floor_item, request.item):
                self.floor_item = request.item  # grants follow the latest item asking
            if request.kind is RequestKind.RERUN:
                self.floor = max(self.floor, request.want)
                self.rerunning = True
            else:
                self.floor = max(self.floor, self.open + self.connecting + 1)
                self.connecting += 1
        self.requests.remove(request)

    def ask(self, request: Request) -> None:
        """A request from one of its items (``item``: which, if still queued)."""
        item = request.item
        if item is None or item not in self.queue:
            request.item = self.queue[0] if self.queue else None
        else:
            self.forget_ended(item)
        if request.kind is RequestKind.RERUN:
            self.floor = 0  # the first attempt is over; what it was granted is free
        self.requests.append(request)

    def forget_ended(self, item: int) -> None:
        """``item`` asks: the items queued before it have ended (a worker runs its queue in
        order), even if their completion has not reached us yet. What was granted to them
        is free (their counts, sent before this request, are already taken), and requests
        of theirs left unanswered by a timeout are void."""
        ended = set(itertools.islice(self.queue, self.queue.index(item)))
        if not ended:
            return
        for index in ended:
            self._unregrant(index)  # its rerun is over: its room with it
        if self.floor_item in ended:
            self.free_grants()
        self.requests = self.outliving(ended)

    def free_grants(self) -> None:
        self.floor = 0
        self.connecting = 0
        self.loose = 0
        self.floor_item = None
        self.rerunning = False

    def outliving(self, ended: set[int]) -> list[Request]:
        """The requests that outlive the ``ended`` items: those of other items, and a
        pool's background connects (still waiting in the pool's thread: they pass to the
        worker's next item)."""
        kept = []
        for request in self.requests:
            if request.item in ended:
                if not request.background:
                    continue
                request.item = next((i for i in self.queue if i not in ended), None)
            kept.append(request)
        return kept

    def queued_before(self, later: int | None, earlier: int | None) -> bool:
        """Whether ``earlier`` sits before ``later`` in the queue."""
        if later not in self.queue or earlier not in self.queue:
            return False
        return self.queue.index(earlier) < self.queue.index(later)  # type: ignore[arg-type]

    def wants(self, need_of: Callable[[int], int], most: int) -> int:
        """The most its head, held back by the budget, or its requests want (0: none); a
        rerun, which asks for the whole budget, wants ``most`` at most (what the budget
        may grow to)."""
        wants = [min(r.want, most) for r in self.requests]
        if self.requests:
            wants.append(self.open + self.connecting + 1)
        if self.waiting_since and self.granted < len(self.queue):
            wants.append(need_of(self.queue[self.granted]))
        return max(wants, default=0)

    def describe(self) -> str:
        return (
            f"open={self.open} idle={self.idle} floor={self.floor} need={self.granted_need()} "
            f"go={self.granted}/{len(self.queue)} req={[r.kind.value for r in self.requests]}"
            f"{' rel' if self.release_sent else ''}"
        )


def seconds_ahead(state: Holder, seconds_of: Callable[[int], float]) -> float:
    """Expected seconds of the worker's go'ed items after the one it runs (or starts):
    its goes ahead of time."""
    return sum(map(seconds_of, itertools.islice(state.queue, 1, state.granted)))


def settled(state: Holder, seconds_of: Callable[[int], float], refill: float) -> bool:
    """Whether the worker waits for nothing: no request, no item held back by the budget,
    every queued item go'ed, or, holding connections, at least ``refill`` seconds of
    goes ahead (a pass tops them up only below that)."""
    if state.requests or state.waiting_since:
        return False
    if state.granted == len(state.queue):
        return True
    return state.commitment() > 0 and seconds_ahead(state, seconds_of) >= refill


def waiting_requests(holders: Iterable[Holder]) -> list[Request]:
    """Connect requests first, oldest first: they come from running items, whose ending
    is what frees room; then reruns, which wait for the run to drain."""
    waiting = [r for s in holders for r in s.requests]
    return sorted(waiting, key=lambda r: (r.kind is RequestKind.RERUN, r.order))


def largest_want(holders: Iterable[Holder], need_of: Callable[[int], int], most: int) -> int:
    """The most any worker's head or requests want (``Holder.wants``; 0: none waits)."""
    return max((state.wants(need_of, most) for state in holders), default=0)


def mid_test_waits(holders: Iterable[Holder]) -> tuple[int | None, bool]:
    """The item of the test that has waited longest mid-test for a connection (a pool's
    own connect aside; -1: not known; None: none waits): it holds others meanwhile, so
    across runs it may wait on another such test; and whether a rerun waits so: it
    never gives way (it has no third attempt)."""
    waiting: list[Request] = []
    rerun = False
    for state in holders:
        connects = [r for r in state.requests if r.kind is RequestKind.CONNECT and not r.background]
        waiting.extend(connects)
        rerun = rerun or (state.rerunning and bool(connects))
    if not waiting:
        return None, rerun
    oldest = min(waiting, key=lambda r: r.order)
    return (-1 if oldest.item is None else oldest.item), rerun


def go_order(holders: Mapping[W, Holder], first: W | None) -> list[W]:
    """``first`` (the serial lane's worker: the critical path), then waiting heads,
    oldest first, then by arrival."""
    return sorted(
        holders,
        key=lambda w: (
            w != first,
            holders[w].waiting_since == 0,
            holders[w].waiting_since,
            holders[w].order,
        ),
    )


def can_progress(holders: Mapping[W, Holder], blocked: list[W]) -> bool:
    """Whether some worker will free room without help: it is running an item that waits
    for nothing (its end frees room), or it is about to answer a request to release idle
    connections."""
    stuck = set(blocked)
    for worker, state in holders.items():
        if state.release_sent:
            return True
        if worker not in stuck and state.granted and not state.requests:
            return True
    return False
