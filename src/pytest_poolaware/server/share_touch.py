"""Whether a run sharing the server's room is in touch with the others, and how it gets
back in touch when its coordinating connection drops.

The run's leases die with that connection, so the others may hand them out at once.
Until it has rejoined (a new connection, new leases) the run holds itself to a budget
that is safe whatever they do (``share_plan.SafeBudget``), and it tries to rejoin a few
times, with growing pauses, so that an administrator's brief change (connections
terminated, a limit lowered for a moment) is ridden out. ``share.ShareCoordinator``
drives it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

from pytest_poolaware.server.connection import close_quietly
from pytest_poolaware.server.share_plan import SafeBudget

#: Tries to rejoin the other runs once the coordinating connection dropped, and the
#: pause before the first (seconds; doubled before each next one): about 15 s in all,
#: long enough for an administrator's brief change (a limit lowered a moment) to pass.
REJOIN_TRIES: Final = 5
REJOIN_PAUSE: Final = 0.5

T = TypeVar("T")


class Touch:
    """The run's touch with the other runs: lost (with the safe budget meanwhile) or not,
    the tries left to rejoin, and the notes of each loss."""

    def __init__(
        self,
        reconnect: Callable[[], Any] | None,
        stop: threading.Event,
        clock: Callable[[], float],
    ) -> None:
        self._reconnect = reconnect
        self._stop = stop
        self._clock = clock
        #: Out of touch: the safe budget, and why and since when; None while in touch.
        self.safe: SafeBudget | None = None
        self._lost: tuple[str, float] | None = None
        self._tries_left = REJOIN_TRIES
        #: Runs (this one included) at the last look: the safe budget's even part.
        self.runs_seen = 1
        #: A connection opened to rejoin (this owns it), and the notes of each rejoin.
        self.connection: Any = None
        self.interruptions: list[str] = []
        #: Why sharing stopped for good (None: it did not).
        self.problem: str | None = None

    @property
    def lost(self) -> bool:
        return self.safe is not None

    def lose(self, cause: str, *, held: int, allows: int) -> SafeBudget:
        """The connection failed holding ``held`` test leases: the safe budget from now."""
        self.safe = SafeBudget(held=held, allows=allows, runs=self.runs_seen)
        self._lost = (cause, self._clock())
        if self._reconnect is None:
            self.problem = f"sharing the server's room stopped: {cause}; {self._words()}"
        return self.safe

    def rejoin(self, join: Callable[[Any], T]) -> T | None:
        """A new connection, and ``join`` on it (the leases), a few tries with growing
        pauses; None once the tries are spent (``problem`` says why) or the run stops."""
        assert self._lost is not None
        cause, since = self._lost
        pause = REJOIN_PAUSE
        while self._tries_left > 0 and self._reconnect is not None:
            self._tries_left -= 1
            if self._stop.wait(pause):
                return None
            pause *= 2
            connection = None
            try:
                connection = self._reconnect()
                joined = join(connection)
            except Exception as exc:
                close_quietly(connection)
                cause = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
                continue
            close_quietly(self.connection)
            self.connection = connection
            self.interruptions.append(
                f"the coordinating connection dropped ({self._lost[0]}); the run rejoined "
                f"the other runs after {self._clock() - since:.1f}s, meanwhile {self._words()}"
            )
            self.safe, self._lost = None, None
            return joined
        self.problem = (
            f"sharing the server's room stopped: {cause}; the run could not rejoin the "
            f"other runs and went on {self._words()}"
        )
        return None

    def in_touch(self) -> None:
        """A look went through after rejoining: a later drop has its tries anew."""
        self._tries_left = REJOIN_TRIES

    def stopped(self) -> None:
        """The run ends: the connection opened to rejoin goes, and a loss not yet made
        good is a note."""
        close_quietly(self.connection)
        if self._lost is not None and self.problem is None:
            self.problem = (
                f"sharing the server's room stopped: {self._lost[0]}; the run ended before "
                f"it could rejoin the other runs, {self._words()}"
            )

    def _words(self) -> str:
        """The safe budget in words, for the notes."""
        safe = self.safe
        assert safe is not None
        return (
            f"holding itself to the {safe.held} connection(s) it held, falling to "
            f"{safe.floor} (the room divided by the {self.runs_seen} run(s) last seen) "
            "as its tests ended"
        )
