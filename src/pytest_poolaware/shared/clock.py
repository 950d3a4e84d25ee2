"""The plugin's own clocks and bounded waits, which a test that moves time cannot move.

Suites move or freeze the clock: time-machine patches ``time.time`` (and ``datetime``)
at the C level, so every reference to it moves; freezegun rebinds ``time.time``,
``time.monotonic`` and ``time.perf_counter`` wherever they are module attributes, the
plugin's own modules included; ``mock.patch("time.time")`` rebinds one. The plugin's
stamps (when a test started and ended, the timeline, the trace, sharing's "held back"
spans) and its bounded waits must not move with them, or a report reads "wall
1297461716s" and a wait that should end never does.

So the plugin reads ``time.perf_counter`` through a reference that is not a module
attribute (held on an instance, which freezegun does not rebind; time-machine leaves the
monotonic clocks alone), and derives wall-clock stamps from it, anchored to
``time.time()`` when this module was imported: before any test of the run could move it.
Each process anchors its own, from the same system clock, so stamps compare across the
controller and its workers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

T = TypeVar("T")


#: How many times the anchor is read, keeping the read least disturbed: a process
#: descheduled between reading the two clocks would shift every stamp it makes by that
#: pause, and the stamps of the controller and its workers are compared with each other.
ANCHOR_READS: Final = 5


class _Reference:
    """The real clock and its anchor, out of reach of module-attribute patching."""

    def __init__(self) -> None:
        self.counter: Callable[[], float] = time.perf_counter
        self.wall_at_anchor, self.counter_at_anchor = _anchor(self.counter)


def _anchor(counter: Callable[[], float]) -> tuple[float, float]:
    """A ``time.time()`` and the counter's reading at the same moment: of a few reads,
    the one whose wall-clock read the two counter reads bracket most tightly."""
    reads = []
    for _ in range(ANCHOR_READS):
        before = counter()
        wall_now = time.time()
        after = counter()
        reads.append((after - before, wall_now, (before + after) / 2))
    _, wall_now, counter_now = min(reads)
    return wall_now, counter_now


_REFERENCE: Final = _Reference()


def monotonic() -> float:
    """Seconds on a monotonic clock no test can move: for durations and deadlines."""
    return _REFERENCE.counter()


def wall() -> float:
    """Seconds since the epoch, as ``time.time()`` would say had no test moved it."""
    reference = _REFERENCE
    return reference.wall_at_anchor + (reference.counter() - reference.counter_at_anchor)


async def bounded(awaitable: Awaitable[T], seconds: float) -> T | None:
    """Await at most ``seconds`` of real time; None if they passed first.

    An event loop's timers (``asyncio.wait_for``) follow ``loop.time()``, which reads
    ``time.monotonic`` at call time: a test freezing it with freezegun would turn a
    bounded wait into an endless one. A thread's timer is out of its reach.
    """
    import asyncio  # here: every pytest session imports the plugin, few run event loops

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(awaitable)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
            loop.call_soon_threadsafe(task.cancel)

    timer = threading.Timer(max(0.0, seconds), expire)
    timer.daemon = True
    timer.start()
    try:
        return await task
    except asyncio.CancelledError:
        if expired.is_set() and task.cancelled():
            return None
        raise
    finally:
        timer.cancel()
