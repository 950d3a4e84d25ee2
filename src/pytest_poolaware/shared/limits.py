"""What the planner follows of the run's budget, and what it says of the run's use, records
of their own: the budget's owner writes ``Limits`` (from the server's share when runs
share the room) and reads ``RunUse``, the planner the other way round, and neither
imports the other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """The connections the run's tests may hold now, and how a wait for more ends."""

    #: The budget now: the run's share when it shares the server's room; 0 while the
    #: request another run made first needs all of the room (nothing new starts).
    budget: int
    #: What the budget may still grow to (another run gives its share back): an item
    #: needing more than the budget, but no more than this, waits for it rather than go
    #: past the budget. Never below ``budget``.
    ceiling: int = 0
    #: An older test of another run waits mid-test for connections this run's waiting
    #: test holds: that test gives way (fails and is rerun alone; ``share_plan.gives_way``).
    give_way: bool = False
    #: Whether an item nothing else can free room for may go past the budget, alone.
    #: Sharing the room, only with no other run there, and once connections of no run
    #: that hold the room have had their time to close.
    may_pass: bool = True

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise ValueError(f"budget must not be negative, got {self.budget}")
        object.__setattr__(self, "ceiling", max(self.budget, self.ceiling))


@dataclass(frozen=True)
class RunUse:
    """What the run uses and waits for, as its planner says after every decision: a share
    of the server's room moves on it."""

    #: Connections committed to its workers (open, granted, or reserved for a go).
    in_use: int
    #: Connections its workers have open.
    open: int
    #: Whether it has work left.
    pending: bool
    #: The need of the largest item held back by the budget (0: none is).
    wants: int = 0
    #: The budget the planner uses now: leases never fall below it, since the planner may
    #: grant up to it before it hears of a smaller one.
    using: int = 0
    #: A rerun waits mid-test for a connection: it cannot give way (no third attempt).
    rerun_waits: bool = False
    #: The item of the test waiting longest mid-test for a connection, holding others
    #: (None: none waits so): across runs, such tests may wait on each other
    #: (``share_plan.gives_way``); the item keeps its ticket's age from one connect to
    #: the next.
    stuck: int | None = None
