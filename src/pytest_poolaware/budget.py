"""The run's budget over time, in one owner.

A run's budget has a story: the configured one (``Settings``, read once and never
written), a stand-in the last run learned, the room the server allows the login (read
with a DSN, or learned from the workers' first connection), the tightest room among
the other logins the tests use, and a share of that room when other runs use the same
server. ``RunBudget`` takes each of these as it comes in, decides the budget and the
words for where it came from, and publishes each change once: what the planner follows
(``Limits``) and what the workers are told (``RoomKnown``).

Everything here runs on the controller's main thread. The server learned, another
login read and the share moving happen in threads of their own; ``poll`` takes them in
(the dispatcher calls it before every decision) and publishes what changed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from pytest_poolaware.server.learning import REMEMBERED, ServerLearning, on_this_machine
from pytest_poolaware.server.login_rooms import FirstLogin, OtherLogins
from pytest_poolaware.server.room import (
    CONFIGURED_TOO_LARGE,
    BudgetChoice,
    Room,
    ServerFacts,
    choose_budget,
)
from pytest_poolaware.shared.limits import Limits, RunUse
from pytest_poolaware.shared.protocol import RoomKnown, RoomRequest, ServerSeen

if TYPE_CHECKING:
    from pytest_poolaware.shared.settings import Settings

N = TypeVar("N", bound=Hashable)


class Share(Protocol):
    """This run's share of the server's room, moving with the other runs'
    (``share.ShareCoordinator``): what the owner reads of it and tells it."""

    def limits(self) -> Limits: ...

    def cap(self, ceiling: int) -> None: ...

    def report(self, use: RunUse) -> None: ...

    def held_back_during(self, start: float, end: float) -> bool: ...

    def held_back_waits(
        self, nodeid: str, waits: Iterable[tuple[float, float]]
    ) -> tuple[tuple[float, float], ...]: ...


@dataclass(frozen=True)
class Change:
    """One change of the budget, published once; a part is None when it did not change."""

    #: What the planner follows from now on.
    planner: Limits | None = None
    #: What every worker is told: the budget a test may have alone, and the room.
    workers: RoomKnown | None = None


@dataclass(frozen=True)
class BudgetStatistics:
    """The budget as it stands."""

    budget: int
    #: Where it came from, in words (the summary's "budget: N connections (...)").
    source: str
    #: When the budget is the server's room: what the server allows the login in all,
    #: and which limit that is.
    room: tuple[int, str] | None
    #: The server is still being learned: workers say where their first connection went.
    learning: bool


class RunBudget(Generic[N]):
    """The run's budget: every input that moves it, and the one place that says so.

    Inputs: ``remember`` (the last run's learned budget), ``discovered`` (the server's
    room for the first login), ``share_room`` and ``take_share`` (sharing it with other
    runs), ``learned`` (that room came from the workers' first connection), ``login_read``
    (another login of the tests). ``subscribe`` to be told each change once, at ``poll``.
    """

    def __init__(self, budget: int, source: str, *, configured: bool = True) -> None:
        #: What the user set (budget, where it came from), if anything: the server's room
        #: is weighed against it, and it is never rewritten.
        self.configured = (budget, source) if configured else None
        self.budget = budget
        self.source = source
        #: When the budget is the server's room: what it allows the login, and which
        #: limit (a test needing more than that fails with a clear message).
        self.room: tuple[int, str] | None = None
        #: The budget's own warnings for the summary (a configured budget too large).
        self.warnings: list[str] = []
        self._share: Share | None = None
        self._learning: ServerLearning[N] | None = None
        #: The budget as the first login's room set it, before any other login's (see
        #: ``_bind_tightest``), and whether the server's room was read then.
        self._first_login: FirstLogin | None = None
        self._room_learned = False
        #: Other logins of the run's tests on the learned server, in the order read: what
        #: the server said of each, and their rooms as last counted.
        self.other_logins = OtherLogins()
        #: Other logins whose limits could not be read (notes).
        self._login_notes: list[str] = []
        self._subscribers: list[Callable[[Change], None]] = []
        #: The run's connections open now, as the planner counts them (``subscribe``).
        self._open_now: Callable[[], int] = lambda: 0
        self._published = self._now()

    @classmethod
    def from_settings(cls, settings: Settings) -> RunBudget[N]:
        return cls(settings.budget, settings.budget_source, configured=settings.budget_configured)

    # -- publishing ---------------------------------------------------------------------------

    def subscribe(
        self, on_change: Callable[[Change], None], *, open_now: Callable[[], int] | None = None
    ) -> Limits:
        """Be told each change from now on; returns what the planner follows now.
        ``open_now`` counts the run's open connections (the planner's): another login's
        room is counted with them."""
        self._publish()
        self._subscribers.append(on_change)
        if open_now is not None:
            self._open_now = open_now
        return self._published[0]

    def poll(self) -> None:
        """Take in what the threads found (the server learned or another login read: the
        learning hands it to the plugin's own connection, which calls ``discovered``,
        ``learned`` or ``login_read``; the share moved) and publish the change, if any."""
        if self._learning is not None:
            self._learning.take()
        self._publish()

    def statistics(self) -> BudgetStatistics:
        learning = self._learning is not None and self._learning.pending
        return BudgetStatistics(self.budget, self.source, self.room, learning)

    def _now(self) -> tuple[Limits, RoomKnown]:
        share = self._share
        limits = Limits(self.budget) if share is None else share.limits()
        allows, limit = self.room if self.room is not None else (None, "")
        return limits, RoomKnown(self.budget, allows, limit)

    def _publish(self) -> None:
        """Tell every subscriber what changed since the last time, once."""
        now = self._now()
        (limits, told), (last_limits, last_told) = now, self._published
        self._published = now
        change = Change(
            limits if limits != last_limits else None, told if told != last_told else None
        )
        if change.planner is None and change.workers is None:
            return
        for on_change in list(self._subscribers):
            on_change(change)

    # -- inputs -------------------------------------------------------------------------------

    def remember(self, remembered: object) -> None:
        """What the last run learned from the server (the pytest cache's value), as the
        stand-in until this run learns it again, when that is smaller."""
        if not isinstance(remembered, dict):
            return
        budget, source = remembered.get("budget"), remembered.get("source")
        if isinstance(budget, int) and 1 <= budget < self.budget and source:
            self.budget, self.source = budget, f"{source}, {REMEMBERED}"

    def to_remember(self) -> dict[str, Any] | None:
        """The budget learned from the server, as the next run's stand-in (None: nothing
        was learned)."""
        if not self._room_learned:
            return None
        return {"budget": self.budget, "source": self.source}

    def discovered(self, choice: BudgetChoice | None, room: Room | None, *, sharing: bool) -> None:
        """The server was read (``choice`` None: it could not be, and the budget stays).
        ``sharing``: the room will be shared, and the share warns of its own."""
        if choice is None:
            return
        self.budget, self.source = choice.budget, choice.source
        if room is not None and choice.budget >= room.budget:
            self.room = (room.allows, room.limit)
        if choice.warning and not sharing:
            self.warnings.append(choice.warning)

    def share_room(self, alone: Room) -> int | None:
        """The room is shared with the other runs of the name space: the budget is then
        the room as if this run were alone (``alone``), and the run's share of it moves
        with the others. Returns that ceiling (None: no room to share)."""
        ceiling = choose_budget(self.configured, alone)
        if ceiling.no_room:
            return None
        if ceiling.warning:
            self.warnings.append(ceiling.warning)
        self.room = (alone.allows, alone.limit) if ceiling.budget >= alone.budget else None
        self.budget, self.source = ceiling.budget, ceiling.source
        return ceiling.budget

    def take_share(self, share: Share) -> None:
        """Follow ``share`` from now on: the planner's budget is the run's share."""
        self._share = share

    def learn_with(self, learning: ServerLearning[N]) -> None:
        """No DSN: the server is learned from the workers' first connection."""
        self._learning = learning

    def learned(self, room_read: bool) -> None:
        """The learned server was adopted (``discovered``, and shared perhaps): the budget
        as it stands is the first login's; other logins can only lower it.
        ``room_read``: the server's room was read (the next run may start within it)."""
        self._first_login = FirstLogin(self.budget, self.source, self.room, self._too_large())
        self._room_learned = room_read

    def login_read(self, login: ServerSeen, read: ServerFacts | str, runs: Collection[int]) -> None:
        """Another login on the learned server was read (``read``: its facts, or why they
        could not be): the run's budget becomes the tightest room among the logins read,
        since every connection the run opens counts against that one budget. ``runs``:
        the run's backend pids known by now."""
        where = login.where()
        if isinstance(read, str):
            self._login_notes.append(
                f"tests also connected as {where}: what the server allows that login could "
                f"not be read ({read}); the budget leaves it out"
            )
            return
        self.other_logins.add(where, read, self._open_now())
        self._bind_tightest(runs)

    def _bind_tightest(self, runs: Collection[int]) -> None:
        """The budget from every login read, each counted again with the run's backends
        known by now (``runs``): a worker's connection the server listed before its worker
        said so was counted as another client's when its login was read, and is the run's
        own. The budget may rise back (never above the first login's) once it is."""
        first = self._first_login
        if first is None:
            return
        tightest = self.other_logins.bind(self.configured, runs)
        budget, source, room, warning = first.budget, first.source, first.room, first.warning
        if tightest is not None and tightest.choice.budget < first.budget:
            choice = tightest.choice
            budget = choice.budget
            source = (
                f"{choice.source}; {tightest.where} binds, the tightest of "
                f"{self.other_logins.count + 1} logins"
            )
            room = None if choice.no_room else (tightest.room.allows, tightest.room.limit)
            warning = choice.warning
        # One warning of a configured budget too large: the binding login's.
        self.warnings = [w for w in self.warnings if not w.startswith(CONFIGURED_TOO_LARGE)]
        self.warnings += [warning] if warning else []
        changed = budget != self.budget
        self.budget, self.source = budget, source
        if not changed:
            return
        self.room = room
        if self._share is not None:
            self._share.cap(budget)

    def _too_large(self) -> str | None:
        """The warning of a configured budget above the room, if any."""
        return next((w for w in self.warnings if w.startswith(CONFIGURED_TOO_LARGE)), None)

    # -- what the learning and the share need on the way ---------------------------------------

    def seen(self, login: ServerSeen, spec: Any) -> None:
        """A worker opened its first connection as ``login`` (``ServerLearning.seen``);
        ``spec``: its gateway's (``execnet.XSpec``), which says whether it runs on this
        machine, where a local address means the same server."""
        if self._learning is not None:
            self._learning.seen(login, on_this_machine(spec))

    def holds(self, node: N, request: RoomRequest) -> str | None:
        """Why a connect request waits for the server (or a login) to be read; None: it
        does not wait for that."""
        return None if self._learning is None else self._learning.hold(node, request)

    def item_done(self, node: N, item: int) -> None:
        if self._learning is not None:
            self._learning.item_done(node, item)

    def worker_gone(self, node: N) -> None:
        if self._learning is not None:
            self._learning.worker_gone(node)

    @property
    def sharing(self) -> bool:
        return self._share is not None

    def report_use(self, use: RunUse) -> None:
        """What the run uses and waits for, after every decision: the share moves on it."""
        if self._share is not None:
            self._share.report(use)

    def held_back_during(self, start: float, end: float) -> bool:
        """Whether another run held this one back between two ``time.time()``s."""
        return self._share is not None and self._share.held_back_during(start, end)

    def held_back_waits(
        self, nodeid: str, waits: Iterable[tuple[float, float]]
    ) -> tuple[tuple[float, float], ...]:
        """The parts of a finished test's waits during which another run held this one
        back (none when the run does not share the room)."""
        return () if self._share is None else self._share.held_back_waits(nodeid, waits)

    def notes(self) -> list[str]:
        """What the summary says of the logins the tests used (nothing with a DSN given)."""
        learning = self._learning.notes() if self._learning is not None else []
        return [*learning, *self.other_logins.notes(), *self._login_notes]
