"""The no-progress rule between runs sharing the server's room (``docs/sharing.md``).

A run stopped at ``breakpoint()``, suspended (SIGSTOP, Ctrl-Z) or wedged keeps its
coordinating session, so its leases live on and keepalives do not free them. The others
stop honouring them once its coordinating connection has been silent for
``share_plan.STALLED_AFTER`` (``Leases.look``), and count its open connections as a
client's that takes no part. The run itself, when it moves again, cannot know what they
handed out meanwhile: until its next step it starts nothing new (``held_to``), and on
that step it gives back the leases its tests do not use and takes room again only from
what the server has free. Every run says so in its summary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from pytest_poolaware.server.leases import Leases
from pytest_poolaware.server.share_plan import Others


class Progress:
    """When this run last completed a step, and the notes of stalls seen, its own and
    the other runs'."""

    def __init__(self, stalled_after: float, clock: Callable[[], float]) -> None:
        self.stalled_after = stalled_after
        self._clock = clock
        #: When the last step completed (None: none yet, or out of touch since).
        self._last: float | None = None
        self._noted: set[int] = set()
        #: When the step under way began (``resuming``).
        self._began = clock()
        self.notes: list[str] = []

    def silent(self) -> bool:
        """Whether this run has not completed a step for longer than the others wait:
        they no longer honour its leases."""
        return self._last is not None and self._clock() - self._last > self.stalled_after

    def resuming(self, leases: Leases, committed: int) -> None:
        """A step begins: after a silence, give back the leases the tests do not use (the
        others may have handed that room out), with a note."""
        self._began = self._clock()
        if self._last is None or not self.silent():
            return
        gap = self._clock() - self._last
        leases.move_to(min(leases.slots, committed + 1))
        self.notes.append(
            f"this run made no progress for {gap:.1f}s (suspended or wedged): the other "
            f"runs stopped honouring its leases after {self.stalled_after:g}s; it gave "
            "back those its tests did not use and took room again from what the server "
            "had free"
        )

    def stepped(self) -> bool:
        """The step begun at ``resuming`` completed; False if it took longer than the
        others wait (the run was stopped or wedged midway): what it saw is stale and the
        others stopped honouring its leases meanwhile, so it follows none of it and stays
        silent, holding itself to what it uses, until its next step resumes."""
        now = self._clock()
        if now - self._began > self.stalled_after:
            return False
        self._last = now
        return True

    def forget(self) -> None:
        """Out of touch: the leases are gone anyway, and the safe budget holds."""
        self._last = None

    def saw(self, others: Others) -> None:
        """Note each other run found stalled, once a run."""
        for run, leases in others.stalled.items():
            if run not in self._noted:
                self._noted.add(run)
                self.notes.append(
                    f"another run (its coordinating connection's backend pid {run}) made "
                    f"no progress for {self.stalled_after:g}s (suspended or wedged) "
                    f"holding {leases} lease(s): they were no longer honoured, its open "
                    "connections counted as another client's"
                )


#: Seconds the head of the ticket queue may wait with its leases not growing before it
#: stops holding the other runs back: connections they keep open between tests (a
#: Django connection per worker, a session fixture's) are leased and never come back
#: while those runs live, so a request needing them would stop every run until its
#: go timed out. Its ticket then asks for more than any room (everyone leaves it out)
#: until the request ends, and it waits for their tests to end as without a ticket.
HEAD_PATIENCE: Final = 30.0


class HeadPatience:
    """The progress rule at the head of the ticket queue: a request whose run's leases
    stop growing for ``seconds`` is given up (``HEAD_PATIENCE``)."""

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self._clock = clock
        #: Since when the run has been at the head with its leases not growing.
        self._since: float | None = None
        self._slots = 0
        #: The request under way was given up; how many times that happened.
        self.gave_up = False
        self.times = 0

    def step(self, head: bool, slots: int) -> None:
        """A step's outcome: whether the run is at the head, and its slot leases."""
        grew, self._slots = slots > self._slots, slots
        if not head:
            self._since = None
        elif grew or self._since is None:
            self._since = self._clock()
        elif not self.gave_up and self._clock() - self._since > self.seconds:
            self.gave_up = True
            self.times += 1

    def asked(self, amount: int, *, more_than_any: int) -> int:
        """What the run's ticket asks for: ``amount``, or, for a request given up until
        it ends (an amount of 0), ``more_than_any`` room, which every run leaves out."""
        self.gave_up = self.gave_up and amount > 0
        return max(amount, more_than_any) if self.gave_up else amount
