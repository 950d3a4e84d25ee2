"""Every connect request's wait at the gate, judged on the controller.

A wait for a full budget is the budget doing its work. A wait while the budget had room
is a fault of the plugin's own, reported as one with its cause (``findings.Stall``):
the planner grants a request as soon as it has room for it, so a request can only wait
with room before the planner sees it, while it is held as the server (or another
login) is read, or while it lies unread in the side channel's inbox because the
controller's main thread is busy elsewhere.

The watch follows a request from its arrival (stamped by the side channel's receiving
thread) to the planner: granted at once, the whole wait had room; kept waiting there,
the wait before had room only if the planner had room when it was held. A request whose
worker gave up on it (its gate timed out: the worker's note names it) while it was held
with room is a fault as well, whenever the controller gets to it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from pytest_poolaware.reporting.findings import Stall
from pytest_poolaware.shared.clock import monotonic
from pytest_poolaware.shared.protocol import RoomRequest

#: Seconds a connect may wait at the gate while the budget has room before the wait is a
#: fault: a round trip to the controller takes milliseconds, reading a login's room
#: about as long.
WAIT_WITH_ROOM: Final = 1.0

N = TypeVar("N", bound=Hashable)


def read_late(seconds: float) -> str:
    """The cause of a request that lay unread while the controller did something else."""
    return (
        f"the controller read the request {seconds:.1f}s after it came (its main thread "
        "was busy elsewhere)"
    )


@dataclass
class _Waiting:
    """One request on its way to the planner."""

    item: int
    arrived: float
    #: Why it was last held before the planner saw it (""), since when (None: it is not
    #: held now), and for how long in all.
    cause: str = ""
    held_at: float | None = None
    held_for: float = 0.0
    #: Whether the planner had room for it when it was held.
    room: bool = False

    def back(self, now: float) -> None:
        """It comes back from being held."""
        if self.held_at is not None:
            self.held_for += now - self.held_at
            self.held_at = None


class GateWatch(Generic[N]):
    """The waits of the run's connect requests, judged as they reach the planner; faults
    go to ``stalls``. ``name_of`` names a worker for the report. Runs on the controller's
    main thread (the arrival stamps come from the receiving threads)."""

    def __init__(
        self,
        stalls: list[Stall],
        name_of: Callable[[N], str],
        *,
        limit: float = WAIT_WITH_ROOM,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self.stalls = stalls
        self._name_of = name_of
        self._limit = limit
        self._clock = clock
        self._waiting: dict[tuple[N, int], _Waiting] = {}
        #: Requests already reported as faults (a later note on them is not a wait for
        #: the budget).
        self._faults: set[tuple[N, int]] = set()

    def arrived(self, node: N, request: RoomRequest, at: float | None) -> None:
        """The dispatcher reads ``request`` (which came at ``at``; None: now), the first
        time or back from being held. A rerun's request waits for the run to drain, by
        design: it is not judged."""
        now = self._clock()
        key = (node, request.request)
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.back(now)
        elif request.want is None:
            self._waiting[key] = _Waiting(request.item, now if at is None else min(at, now))

    def held(self, node: N, rid: int, cause: str, *, room: bool) -> None:
        """The request is held before the planner sees it, for ``cause``; ``room``: the
        planner had room for it then."""
        waiting = self._waiting.get((node, rid))
        if waiting is not None:
            waiting.cause, waiting.held_at = cause, self._clock()
            waiting.room = waiting.room or room

    def considered(self, node: N, rid: int, *, granted: bool) -> None:
        """The planner saw the request: ``granted`` at once (it had room), or kept for room
        (the budget is full: from now on the wait is the budget's)."""
        key = (node, rid)
        waiting = self._waiting.pop(key, None)
        if waiting is not None and (granted or waiting.room):
            self._judge(key, waiting, gave_up=False)

    def gave_up(self, node: N, rid: int) -> bool:
        """The worker's gate timed out on the request: whether that wait was a fault (then
        reported as one, not as a wait for the budget)."""
        key = (node, rid)
        if key in self._faults:
            return True
        waiting = self._waiting.get(key)
        if waiting is None or waiting.held_at is None or not waiting.room:
            return False  # answered, or kept by the planner for room: the budget's wait
        waiting.back(self._clock())
        self._judge(key, waiting, gave_up=True)
        return key in self._faults

    def dropped(self, node: N, rid: int) -> None:
        """The request will not be answered (its worker is gone)."""
        self._waiting.pop((node, rid), None)

    def _judge(self, key: tuple[N, int], waiting: _Waiting, *, gave_up: bool) -> None:
        waited = self._clock() - waiting.arrived
        if waited <= self._limit or key in self._faults:
            return
        late = waited - waiting.held_for
        cause = waiting.cause if waiting.held_for >= late else read_late(late)
        self._faults.add(key)
        self.stalls.append(Stall(self._name_of(key[0]), waiting.item, waited, cause, gave_up))
