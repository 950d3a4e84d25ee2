"""What the planner follows of the run's budget, a record of its own: the budget's owner
writes it (from the server's share when runs share the room), the planner reads it, and
neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """The connections the run's tests may hold now, and how a wait for more ends."""

    #: The budget now: the run's share when it shares the server's room.
    budget: int
    #: What the budget may still grow to (another run gives its share back): an item
    #: needing more than the budget, but no more than this, waits for it rather than go
    #: past the budget. Never below ``budget``.
    ceiling: int = 0
    #: Another run is served first: items blocked on a connection give way (fail and are
    #: rerun alone) rather than hold connections that run waits for.
    give_way: bool = False
    #: Whether an item nothing else can free room for may go past the budget, alone.
    #: Sharing the room, only when the share says so: the server's live count leaves it
    #: room, or the wait for the share to grow is over and no other run is there.
    may_pass: bool = True

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"budget must be positive, got {self.budget}")
        object.__setattr__(self, "ceiling", max(self.budget, self.ceiling))
