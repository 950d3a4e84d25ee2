"""Messages between workers and the controller, over a side channel of xdist's own gateway.

xdist's main channel only carries its own event names, and a worker's test reports reach
the controller only at phase boundaries; connection counts must flow while a test runs.
So the controller opens one more execnet channel per worker on the same gateway (it
works for any ``--tx``, remote workers included) and hands it over in ``workerinput``.

What each item measured travels on its last report instead (``ItemMeasures``).

Worker -> controller (tuples, tag first):
  ("collected", markers, conflicts)  per item (serial_only, parallel_safe); node ids with both
  ("counts", open, idle, released, version)
                                     live connections of the worker process; ``released``
                                     when answering a release request; ``version`` orders
                                     them against the counts on item reports
  ("request", request_id, want, index)
                                     item ``index`` is blocked until it may hold ``want``
                                     connections (None: one more)
  ("note", text)                     a warning to show on the controller
Controller -> worker:
  ("go", [index, ...])  ("grant", request_id, answer)  ("release",)
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final


@dataclass(frozen=True)
class ItemMeasures:
    """What a worker measured of one item; it travels as an
    attribute of the item's last report (xdist serializes report attributes)."""

    need: int  # peak connections checked out at once
    peak_open: int  # peak connections open in the worker, idle ones included
    duration: float  # seconds of the attempt that counted
    waited: float  # seconds spent waiting for the budget (go and connect gate)
    start: float  # wall-clock time.time() when it started
    end: float
    rerun: str  # why it ran twice, "" if it ran once
    open: int  # the worker's open connections once it ended
    idle: int
    version: int  # of the meter's counts above (``PoolMeter.snapshot``)
    #: Its connections met contention: the server refused one (the rerun alone may still
    #: count what the failed attempt's threads held), so ``need`` may count more, or
    #: less, than the test holds alone.
    contended: bool = False

    def to_json(self) -> str:
        """A JSON list in field order, as one string: it rides on every item's report,
        and execnet serializes one string much faster than a list of ten values."""
        return json.dumps([
            self.need, self.peak_open, self.duration, self.waited, self.start, self.end,
            self.rerun, self.open, self.idle, self.version, self.contended,
        ])  # fmt: skip

    @classmethod
    def from_json(cls, data: str) -> ItemMeasures:
        return cls(*json.loads(data))


#: Key under which the side channel travels in ``node.workerinput``.
WORKERINPUT_KEY: Final = "poolaware_channel"

Message = tuple[Any, ...]


class ControllerLink:
    """Controller end for one worker: messages land in a shared inbox, then xdist is woken.

    The channel callback runs in execnet's receiver thread, so it only queues; the
    scheduler drains the inbox on the controller's main thread.
    """

    def __init__(
        self,
        channel: Any,
        node: Any,
        inbox: queue.SimpleQueue[tuple[Any, Message]],
        wake: Callable[[Any], None],
    ) -> None:
        self.channel = channel
        self.node = node
        self._inbox = inbox
        self._wake = wake
        channel.setcallback(self._received, endmarker=None)

    def _received(self, message: Message | None) -> None:
        if message is None:  # channel closed: the worker is gone, xdist reports that
            return
        self._inbox.put((self.node, message))
        if message[0] in WAKING:
            self._wake(self.node)

    def send(self, *message: Any) -> None:
        if not self.channel.isclosed():
            with contextlib.suppress(OSError):  # the worker died meanwhile; xdist reports it
                self.channel.send(message)


#: Messages that can unblock a decision, so the controller must look at them now; the
#: others are read with the next xdist event.
WAKING: Final = frozenset({"request", "counts"})


class WorkerLink:
    """Worker end: send events, and wait (bounded) for the controller's answers."""

    def __init__(self, channel: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.channel = channel
        self._clock = clock
        self._cond = threading.Condition()
        self._goes: set[int] = set()
        self._grants: dict[int, str] = {}
        self._release = False
        self._closed = False
        self._next_request = 0
        channel.setcallback(self._received, endmarker=None)

    def _received(self, message: Message | None) -> None:
        with self._cond:
            if message is None:  # the controller is gone: stop waiting for it
                self._closed = True
                self._cond.notify_all()
                return
            tag = message[0]
            if tag == "go":
                self._goes.update(message[1])
            elif tag == "grant":
                self._grants[message[1]] = message[2]
            elif tag == "release":
                self._release = True
            self._cond.notify_all()

    def send(self, *message: Any) -> None:
        self.channel.send(message)

    def take_release(self) -> bool:
        """Whether the controller asked for idle connections back (clears the request)."""
        with self._cond:
            asked, self._release = self._release, False
            return asked

    def wait_go(self, index: int, on_release: Callable[[], None]) -> None:
        """Block until ``index`` may start (the controller always answers, or goes away)."""
        self._wait(lambda: index in self._goes, None, on_release, self._goes.discard, index)

    def request(
        self, index: int, want: int | None, timeout: float, on_release: Callable[[], None]
    ) -> str | None:
        """Ask for item ``index`` to hold ``want`` connections (None: one more); wait for
        the answer.

        Returns the answer (``core.Answer`` value), or None if ``timeout`` passed first.
        """
        with self._cond:  # tests may connect from several threads at once
            self._next_request += 1
            rid = self._next_request
        self.send("request", rid, want, index)
        granted = self._wait(lambda: rid in self._grants, timeout, on_release, lambda _: None, rid)
        if not granted:
            return None
        with self._cond:
            return self._grants.pop(rid)

    def _wait(
        self,
        ready: Callable[[], bool],
        timeout: float | None,
        on_release: Callable[[], None],
        consume: Callable[[int], None],
        key: int,
    ) -> bool:
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            with self._cond:
                if ready():
                    consume(key)
                    return True
                if self._closed:
                    return False
                if self._release:
                    self._release = False
                    release = True
                else:
                    release = False
                    remaining = None if deadline is None else deadline - self._clock()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                    continue
            if release:  # outside the lock: closing connections may take a moment
                on_release()
