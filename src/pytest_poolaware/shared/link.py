"""The side channel between the controller and each worker, on xdist's own gateway.

xdist's main channel only carries its own event names, and a worker's test reports reach
the controller only at phase boundaries; connection counts must flow while a test runs.
So the controller opens one more execnet channel per worker on the same gateway (it
works for any ``--tx``, remote workers included) and hands it over in ``workerinput``.
What travels on it is defined in ``protocol`` (``docs/design.md``, "Protocol"); this
module only moves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import queue
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Final, Generic, TypeVar

from pytest_poolaware.shared.clock import bounded, monotonic
from pytest_poolaware.shared.protocol import (
    WAKING,
    Answer,
    ControllerMessage,
    Goes,
    Note,
    ProtocolError,
    ReleaseIdle,
    RequestAnswer,
    RoomKnown,
    RoomRequest,
    ServerPids,
    WorkerMessage,
    decode,
)

if TYPE_CHECKING:
    import execnet

#: Key under which the side channel travels in ``node.workerinput``.
WORKERINPUT_KEY: Final = "poolaware_channel"


N = TypeVar("N", bound=Hashable)


class GoWait(enum.Enum):
    """How a worker's wait for its go ended."""

    GO = "go"
    #: The controller went away first (its run was killed).
    GONE = "gone"
    #: The bound passed with no go: the test fails without running, never waits for ever.
    TIMED_OUT = "timed out"


class ControllerLink(Generic[N]):
    """Controller end for one worker (``node``): messages land in a shared inbox, then
    xdist is woken.

    The channel callback runs in execnet's receiver thread, so it only decodes and
    queues; the scheduler drains the inbox on the controller's main thread.
    """

    def __init__(
        self,
        channel: execnet.Channel,
        node: N,
        inbox: queue.SimpleQueue[tuple[N, WorkerMessage]],
        wake: Callable[[N], None],
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self.channel = channel
        self.node = node
        self._inbox = inbox
        self._wake = wake
        self._clock = clock
        #: When each connect request came (``clock``), by id, until the dispatcher takes
        #: it: how long it lay unread is part of its wait (``gate_watch``).
        self.arrivals: dict[int, float] = {}
        channel.setcallback(self._received, endmarker=None)

    def arrival(self, rid: int) -> float | None:
        """When request ``rid`` came (taken once; None: not known)."""
        return self.arrivals.pop(rid, None)

    def _received(self, wire: object) -> None:
        if wire is None:  # channel closed: the worker is gone, xdist reports that
            return
        try:
            message = decode(wire)
        except ProtocolError as exc:
            message = Note(f"ignored a message: {exc}")
        if not isinstance(message, WorkerMessage):
            message = Note(f"ignored a controller's message from a worker: {message!r}")
        if isinstance(message, RoomRequest):
            self.arrivals[message.request] = self._clock()
        self._inbox.put((self.node, message))
        if type(message) in WAKING:
            self._wake(self.node)

    def send(self, message: ControllerMessage) -> None:
        if not self.channel.isclosed():
            with contextlib.suppress(OSError):  # the worker died meanwhile; xdist reports it
                self.channel.send(message.to_wire())


class WorkerLink:
    """Worker end: send events, and wait (bounded) for the controller's answers."""

    def __init__(self, channel: execnet.Channel, clock: Callable[[], float] = monotonic) -> None:
        self.channel = channel
        self._clock = clock
        self._cond = threading.Condition()
        self._goes: set[int] = set()
        self._grants: dict[int, Answer] = {}
        self._release = False
        self._closed = False
        self._next_request = 0
        #: Requests awaited on event loops: woken through their loop, never blocked on.
        self._awaiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = {}
        #: Called (on the receiving thread) with the server's backend pids.
        self.on_server_pids: Callable[[ServerPids], object] | None = None
        #: Called (on the receiving thread) when the run's budget changed mid-run.
        self.on_room_known: Callable[[RoomKnown], object] | None = None
        #: Called (on the receiving thread) when the controller asks for idle connections
        #: back: a worker waiting for work carries that out itself (see ``IdleRelease``).
        self.on_release: Callable[[], object] | None = None
        channel.setcallback(self._received, endmarker=None)

    def _received(self, wire: object) -> None:
        message: WorkerMessage | ControllerMessage | None = None  # None: the controller is gone
        if wire is not None:
            try:
                message = decode(wire)
            except ProtocolError as exc:  # the controller must hear of it: it waits for us
                self.send(Note(f"ignored a message from the controller: {exc}"))
                return
        if isinstance(message, (ServerPids, RoomKnown)):
            self._hand_over(message)
            return
        with self._cond:
            self._record(message)
            self._cond.notify_all()
        if isinstance(message, ReleaseIdle) and self.on_release is not None:
            self.on_release()

    def _hand_over(self, message: ServerPids | RoomKnown) -> None:
        """The messages for the agent's callbacks, called outside the lock: the server's
        pids make the agent send counts."""
        if isinstance(message, ServerPids):
            if self.on_server_pids is not None:
                self.on_server_pids(message)
        elif self.on_room_known is not None:
            self.on_room_known(message)

    def _record(self, message: WorkerMessage | ControllerMessage | None) -> None:
        """Keep what the waits look for (under the lock), and wake the awaited requests
        it concerns."""
        if message is None:  # the controller is gone: stop waiting for it
            self._closed = True
            self._wake_awaiting(None)
        elif isinstance(message, Goes):
            self._goes.update(message.indices)
        elif isinstance(message, RequestAnswer):
            self._grants[message.request] = message.answer
            self._wake_awaiting(message.request)
        elif isinstance(message, ReleaseIdle):
            self._release = True
            self._wake_awaiting(None)

    def _wake_awaiting(self, rid: int | None) -> None:
        """Wake the awaited request ``rid`` (None: all of them), each on its own loop."""
        for key, (loop, future) in list(self._awaiting.items()):
            if rid is None or key == rid:
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    loop.call_soon_threadsafe(_resolve, future)

    def send(self, message: WorkerMessage) -> None:
        """Send to the controller; once it has gone, there is nobody to tell."""
        if self.closed:
            return
        with contextlib.suppress(OSError):  # it went away just now
            self.channel.send(message.to_wire())

    @property
    def release_asked(self) -> bool:
        """Whether the controller asked for idle connections back (leaves the request)."""
        with self._cond:
            return self._release

    def take_release(self) -> bool:
        """Whether the controller asked for idle connections back (clears the request)."""
        with self._cond:
            asked, self._release = self._release, False
            return asked

    @property
    def closed(self) -> bool:
        """Whether the controller has gone (its run was killed, or its connection lost)."""
        with self._cond:
            return self._closed

    def wait_go(self, index: int, on_release: Callable[[], None], timeout: float) -> GoWait:
        """Block until ``index`` may start, the controller goes away, or ``timeout``
        passes (the controller answers every worker, but no wait is unbounded: a
        controller wedged by a fault must not hang the run)."""
        if self._wait(lambda: index in self._goes, timeout, on_release, self._goes.discard, index):
            return GoWait.GO
        return GoWait.GONE if self.closed else GoWait.TIMED_OUT

    def request(
        self,
        index: int,
        want: int | None,
        timeout: float,
        on_release: Callable[[], None],
        *,
        background: bool = False,
    ) -> Answer | None:
        """Ask for item ``index`` to hold ``want`` connections (None: one more); wait for
        the answer.

        Returns the answer, or None if ``timeout`` passed first.
        """
        return self.answer(self.ask(index, want, background=background), timeout, on_release)

    def ask(self, index: int, want: int | None = None, *, background: bool = False) -> int:
        """Send the request of ``request`` without waiting; returns its id (the answer
        names it, and so does a note on a wait for it that timed out)."""
        with self._cond:  # tests may connect from several threads at once
            self._next_request += 1
            rid = self._next_request
        self.send(RoomRequest(rid, want, index, background))
        return rid

    def answer(self, rid: int, timeout: float, on_release: Callable[[], None]) -> Answer | None:
        """Wait for the answer to request ``rid``; None if ``timeout`` passed first."""
        granted = self._wait(lambda: rid in self._grants, timeout, on_release, lambda _: None, rid)
        if not granted:
            return None
        with self._cond:
            return self._grants.pop(rid)

    async def request_async(
        self,
        index: int,
        timeout: float,
        on_release: Callable[[], Awaitable[None]],
        *,
        background: bool = False,
    ) -> Answer | None:
        """``request`` for one more connection, awaited on the running event loop: other
        coroutines of that loop keep running (they may hold what would free room)."""
        rid = self.ask(index, background=background)
        return await self.answer_async(rid, timeout, on_release)

    async def answer_async(
        self, rid: int, timeout: float, on_release: Callable[[], Awaitable[None]]
    ) -> Answer | None:
        """``answer``, awaited on the running event loop."""
        loop = asyncio.get_running_loop()
        deadline = self._clock() + timeout
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
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return None
                await bounded(future, remaining)
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
