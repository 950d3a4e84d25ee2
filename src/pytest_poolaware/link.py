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
  ("request", request_id, want, index, background)
                                     item ``index`` is blocked until it may hold ``want``
                                     connections (None: one more); ``background`` (may be
                                     absent: False) when a pool opens it in its own thread
                                     or task, which is never refused
  ("note", text)                     a warning to show on the controller
Controller -> worker:
  ("go", [index, ...])  ("grant", request_id, answer)  ("release",)
  ("alive", time, [pid, ...])        the backend pids the server listed at ``time`` (when
                                     monitored): connections counted before then and not
                                     listed were ended by the server
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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
    drivers: list[str] = field(default_factory=list)  # drivers of the connections it used
    leaks: int = 0  # connections its own code opened or checked out and still held at its end

    def to_json(self) -> str:
        """A JSON list in field order, as one string: it rides on every item's report,
        and execnet serializes one string much faster than a list of ten values."""
        return json.dumps([
            self.need, self.peak_open, self.duration, self.waited, self.start, self.end,
            self.rerun, self.open, self.idle, self.version, self.drivers, self.leaks,
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
        #: Requests awaited on event loops: woken through their loop, never blocked on.
        self._awaiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = {}
        #: Called (on the receiving thread) with the server's (time, pids).
        self.on_alive: Callable[[float, list[int]], object] | None = None
        channel.setcallback(self._received, endmarker=None)

    def _received(self, message: Message | None) -> None:
        if message is not None and message[0] == "alive":
            if self.on_alive is not None:  # outside the lock: it sends counts
                self.on_alive(message[1], message[2])
            return
        with self._cond:
            if message is None:  # the controller is gone: stop waiting for it
                self._closed = True
                self._cond.notify_all()
                self._wake_awaiting(None)
                return
            tag = message[0]
            if tag == "go":
                self._goes.update(message[1])
            elif tag == "grant":
                self._grants[message[1]] = message[2]
                self._wake_awaiting(message[1])
            elif tag == "release":
                self._release = True
                self._wake_awaiting(None)
            self._cond.notify_all()

    def _wake_awaiting(self, rid: int | None) -> None:
        """Wake the awaited request ``rid`` (None: all of them), each on its own loop."""
        for key, (loop, future) in list(self._awaiting.items()):
            if rid is None or key == rid:
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    loop.call_soon_threadsafe(_resolve, future)

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
        self,
        index: int,
        want: int | None,
        timeout: float,
        on_release: Callable[[], None],
        *,
        background: bool = False,
    ) -> str | None:
        """Ask for item ``index`` to hold ``want`` connections (None: one more); wait for
        the answer.

        Returns the answer (``core.Answer`` value), or None if ``timeout`` passed first.
        """
        rid = self._send_request(want, index, background)
        granted = self._wait(lambda: rid in self._grants, timeout, on_release, lambda _: None, rid)
        if not granted:
            return None
        with self._cond:
            return self._grants.pop(rid)

    def _send_request(self, want: int | None, index: int, background: bool) -> int:
        with self._cond:  # tests may connect from several threads at once
            self._next_request += 1
            rid = self._next_request
        if background:
            self.send("request", rid, want, index, True)
        else:
            self.send("request", rid, want, index)
        return rid

    async def request_async(
        self,
        index: int,
        timeout: float,
        on_release: Callable[[], Awaitable[None]],
        *,
        background: bool = False,
    ) -> str | None:
        """``request`` for one more connection, awaited on the running event loop: other
        coroutines of that loop keep running (they may hold what would free room)."""
        loop = asyncio.get_running_loop()
        rid = self._send_request(None, index, background)
        deadline = loop.time() + timeout
        try:
            while True:
                future: asyncio.Future[None] = loop.create_future()
                with self._cond:
                    if rid in self._grants:
                        return self._grants.pop(rid)
                    if self._closed:
                        return None
                    release, self._release = self._release, False
                    if not release:
                        self._awaiting[rid] = (loop, future)
                if release:
                    await on_release()
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(future, remaining)
        finally:
            with self._cond:
                self._awaiting.pop(rid, None)

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


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
