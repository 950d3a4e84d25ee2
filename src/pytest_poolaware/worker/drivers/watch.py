"""A close is over once the server no longer counts the backend.

The server frees a connection's slot (what a role's connection limit and
``max_connections`` count) only when the backend process exits, a moment after the
client's close. Each counted connection's socket is duplicated when it opens; end-of-file
on the duplicate says the backend is gone. Nothing here knows a driver: the hooks hand
over the connection, its backend pid, its socket and how to tell it is closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import select
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any, Final

from pytest_poolaware.shared.clock import bounded, monotonic

#: Longest wait, after a connection is closed, for its backend to exit. The server frees
#: the backend's slot (what a role's connection limit and max_connections count) only
#: when the backend process exits, a moment after the client's close.
BACKEND_EXIT_TIMEOUT: Final = 1.0
#: Bytes read at a time while waiting for the server's end of the socket to close.
_RECV_BYTES: Final = 4096
#: Longest wait, when the hooks are removed, for the exit watcher's thread to stop.
_WATCHER_STOP_TIMEOUT: Final = 5.0


class _Watch:
    """One counted connection's socket, duplicated when the connection opened."""

    __slots__ = ("deadline", "finalizer", "is_closed", "key", "pid", "ref", "sock")

    def __init__(
        self,
        conn: Any,
        pid: int,
        sock: socket.socket | None,
        is_closed: Callable[[Any], bool],
    ) -> None:
        self.pid = pid
        self.key = id(conn)
        self.ref = weakref.ref(conn)
        self.sock = sock
        self.is_closed = is_closed
        self.deadline = 0.0
        self.finalizer: Any = None

    def hang_up(self) -> None:
        """The client is done with the connection: end our side of the socket too.

        The duplicate keeps the socket open, so a client that drops its socket without
        a Terminate message (asyncpg's ``terminate()``, a collected connection) would
        otherwise leave the backend waiting for more; shutting the write side down sends
        the end-of-stream the backend exits on. What the client wrote before still goes
        out first.
        """
        if self.sock is None:
            return
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def exited_now(self) -> bool:
        """Whether the server's end is closed already (no wait)."""
        if self.sock is None:
            return True
        try:
            self.sock.setblocking(False)
            while True:
                if not self.sock.recv(_RECV_BYTES):
                    return True
        except BlockingIOError:
            return False
        except OSError:  # reset: the backend is gone
            return True

    def await_exit(self) -> None:
        """Block until the server's end closes, at most BACKEND_EXIT_TIMEOUT."""
        if self.sock is None:
            return
        deadline = monotonic() + BACKEND_EXIT_TIMEOUT
        try:
            while (left := deadline - monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(_RECV_BYTES):
                    return
        except OSError:  # timed out, or reset: nothing more to wait for
            return

    async def await_exit_async(self) -> None:
        """``await_exit`` on an event loop, which keeps running meanwhile."""
        if self.sock is None:
            return
        self.sock.setblocking(False)
        loop = asyncio.get_running_loop()
        deadline = monotonic() + BACKEND_EXIT_TIMEOUT
        try:
            while (left := deadline - monotonic()) > 0:
                if not await bounded(loop.sock_recv(self.sock, _RECV_BYTES), left):
                    return  # the server's end closed, or the wait ran out
        except OSError:
            return

    def release(self) -> None:
        if self.sock is not None:
            self.sock.close()


def _duplicate(fileno: Callable[[], int]) -> socket.socket | None:
    try:
        return socket.socket(fileno=os.dup(fileno()))
    except Exception:
        return None


class BackendExits:
    """Reports each counted connection's close once the server has let its backend go.

    Each connection's socket is duplicated when it opens. The server closes its end of
    the socket only once the backend process has exited, so end-of-file on the duplicate
    says the slot is free again. When a close is seen (a close hook, the driver's closed
    flag at a sweep, the garbage collector), the duplicate is hung up and the close is
    reported at its end-of-file, or after BACKEND_EXIT_TIMEOUT at most: until then the
    connection stays counted, so no other worker is granted a slot the server still
    holds. A synchronous close waits for that inline, an asyncio one awaits it; the
    others (asyncpg's closes, which must not block their loop, a psycopg2 connection
    closed without a hook, a collected connection) are watched by one thread.
    """

    def __init__(
        self, report: Callable[[int, int], None], on_error: Callable[[BaseException], None]
    ) -> None:
        self._report = report
        self._on_error = on_error
        self._open: dict[int, _Watch] = {}
        # Handed to the thread; finalizers only append (any lock may be held then).
        self._handed: collections.deque[_Watch] = collections.deque()
        self._pending = 0  # handed over and not reported yet
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._wake_w: int | None = None
        self._wake_r: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- what the hooks call --------------------------------------------------------------

    def track(
        self, conn: Any, pid: int, fileno: Callable[[], int], is_closed: Callable[[Any], bool]
    ) -> None:
        """Start watching a connection that just opened."""
        watch = _Watch(conn, pid, _duplicate(fileno), is_closed)
        with self._lock:
            self._start_thread()
            stale = self._open.get(watch.key)
            if stale is not None and stale.ref() is None:
                # Its connection was collected and the id reused: its finalizer has
                # handed it over already, and the thread will report it.
                pass
            elif stale is not None:
                self._take(stale)
                stale.release()
            self._open[watch.key] = watch
            watch.finalizer = weakref.finalize(conn, self._collected, watch)
            watch.finalizer.atexit = False

    def closed(self, conn: Any) -> None:
        """The client closed ``conn`` (never blocks): reported now if its backend is gone
        already, else by the thread once it is."""
        watch = self._take_conn(conn)
        if watch is None:
            return
        watch.hang_up()
        if watch.exited_now():
            self._finish(watch)
        else:
            self._hand_over(watch)

    def closed_sync(self, conn: Any) -> None:
        """The client closed ``conn``: return once its backend has exited (bounded)."""
        watch = self._take_conn(conn)
        if watch is not None:
            watch.hang_up()
            watch.await_exit()
            self._finish(watch)

    async def closed_async(self, conn: Any) -> None:
        """``closed_sync`` on an event loop, awaiting."""
        watch = self._take_conn(conn)
        if watch is not None:
            watch.hang_up()
            await watch.await_exit_async()
            self._finish(watch)

    def sweep(self, wait: bool) -> None:
        """Hand over the connections their driver now says are closed (psycopg2 has no
        close hook; a broken psycopg connection closes without one); ``wait``: return
        once every close handed over is reported (bounded)."""
        with self._lock:
            watches = list(self._open.values())
        for watch in watches:
            conn = watch.ref()
            if conn is None:
                continue  # its finalizer hands it over
            try:
                gone = watch.is_closed(conn)
            except Exception:
                gone = True
            del conn
            if gone and self._take_if_open(watch):
                watch.hang_up()
                self._hand_over(watch)
        if wait:
            self.settle()

    def settle(self) -> None:
        """Wait until every close handed over is reported, at most BACKEND_EXIT_TIMEOUT
        after the last one."""
        deadline = monotonic() + BACKEND_EXIT_TIMEOUT
        with self._lock:
            while self._pending or self._handed:
                left = deadline - monotonic()
                if left <= 0 or self._thread is None:
                    return
                self._settled.wait(left)

    async def settle_async(self) -> None:
        """``settle`` without blocking the event loop."""
        with self._lock:
            if not (self._pending or self._handed):
                return
        await asyncio.get_running_loop().run_in_executor(None, self.settle)

    def stop(self) -> None:
        """Stop the thread and drop every duplicate (the hooks are being removed)."""
        with self._lock:
            self._stopping = True
            thread, self._thread = self._thread, None
            for watch in self._open.values():
                if watch.finalizer is not None:
                    watch.finalizer.detach()
                watch.release()  # the driver's own descriptor keeps the connection
            self._open.clear()
        if thread is not None:
            self._wake()
            thread.join(_WATCHER_STOP_TIMEOUT)
        while self._handed:
            self._handed.popleft().release()
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = None

    # -- ownership of a watch: exactly one party reports it -------------------------------

    def _take(self, watch: _Watch) -> None:
        """Take ``watch`` out of the open ones (lock held)."""
        del self._open[watch.key]
        if watch.finalizer is not None:
            watch.finalizer.detach()

    def _take_if_open(self, watch: _Watch) -> bool:
        with self._lock:
            if self._open.get(watch.key) is not watch:
                return False
            self._take(watch)
            return True

    def _take_conn(self, conn: Any) -> _Watch | None:
        with self._lock:
            watch = self._open.get(id(conn))
            if watch is None or watch.ref() is not conn:
                return None
            self._take(watch)
            return watch

    def _finish(self, watch: _Watch) -> None:
        watch.release()
        try:
            self._report(watch.pid, watch.key)
        except Exception as exc:
            self._on_error(exc)

    def _collected(self, watch: _Watch) -> None:
        """A tracked connection was garbage-collected (runs inside any allocation, any
        lock held: only queue it and wake the thread)."""
        self._handed.append(watch)
        self._wake()

    def _hand_over(self, watch: _Watch) -> None:
        self._handed.append(watch)
        self._wake()

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")

    # -- the thread ----------------------------------------------------------------------

    def _start_thread(self) -> None:
        """Start the watching thread (lock held) on the first connection."""
        if self._thread is not None or self._stopping:
            return
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(
            target=self._run, args=(self._wake_r,), name="poolaware-backend-exits", daemon=True
        )
        self._thread.start()

    def _run(self, wake: int) -> None:
        poller = select.poll()
        poller.register(wake, select.POLLIN)
        watching: dict[int, _Watch] = {}
        while not self._stopping:
            try:
                self._watch_handed(poller, watching)
                now = monotonic()
                for fd, watch in list(watching.items()):
                    if watch.deadline <= now or watch.exited_now():
                        self._done(poller, watching, fd)
                timeout = min((w.deadline for w in watching.values()), default=None)
                wait_ms = None if timeout is None else max(0, int((timeout - now) * 1000) + 1)
                for fd, _ in poller.poll(wait_ms):
                    if fd == wake:
                        with contextlib.suppress(OSError):
                            os.read(wake, _RECV_BYTES)
            except Exception as exc:  # never let the thread die with closes pending
                self._on_error(exc)
        for watch in watching.values():
            watch.release()

    def _watch_handed(self, poller: select.poll, watching: dict[int, _Watch]) -> None:
        while True:
            with self._lock:
                if not self._handed:
                    return
                watch = self._handed.popleft()
                self._pending += 1
                if self._open.get(watch.key) is watch:  # collected: not taken yet
                    del self._open[watch.key]
            watch.hang_up()
            if watch.sock is None:
                self._finish(watch)
                self._reported()
                continue
            watch.deadline = monotonic() + BACKEND_EXIT_TIMEOUT
            fd = watch.sock.fileno()
            watching[fd] = watch
            poller.register(fd, select.POLLIN)

    def _done(self, poller: select.poll, watching: dict[int, _Watch], fd: int) -> None:
        watch = watching.pop(fd)
        poller.unregister(fd)
        self._finish(watch)
        self._reported()

    def _reported(self) -> None:
        with self._lock:
            self._pending -= 1
            self._settled.notify_all()
