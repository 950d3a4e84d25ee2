"""The controller's end of a worker's side channel, played by a test: it hears what the
worker sends, answers its requests for room as told, and delivers the controller's
messages (``shared.link.WorkerLink`` uses the channel's ``setcallback`` and ``send``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pytest_poolaware.shared.link import WorkerLink
from pytest_poolaware.shared.protocol import (
    Answer,
    ControllerMessage,
    RequestAnswer,
    RoomRequest,
    WorkerMessage,
    decode,
)

#: Bound on waiting for a message from the worker, in seconds.
HEARD_WAIT = 10.0

M = TypeVar("M", bound=WorkerMessage)


class ControllerEnd:
    """The channel; ``answer`` (None: never) is the answer to every request for room."""

    def __init__(self, answer: Answer | None = Answer.GRANTED) -> None:
        self.answer = answer
        self.heard: list[WorkerMessage] = []
        self._callback: Callable[[object], None] | None = None
        self._news = threading.Condition()

    def link(self) -> WorkerLink:
        return WorkerLink(self)  # type: ignore[arg-type]  # the channel's two calls used

    def setcallback(self, callback: Callable[[object], None], endmarker: Any = None) -> None:
        self._callback = callback

    def send(self, wire: Any) -> None:
        message = decode(wire)
        assert isinstance(message, WorkerMessage), message
        with self._news:
            self.heard.append(message)
            self._news.notify_all()
        if isinstance(message, RoomRequest) and self.answer is not None:
            self.deliver(RequestAnswer(message.request, self.answer))

    def deliver(self, message: ControllerMessage) -> None:
        assert self._callback is not None
        self._callback(message.to_wire())

    def close(self) -> None:
        """The controller has gone (execnet's end marker)."""
        assert self._callback is not None
        self._callback(None)

    def of(self, kind: type[M]) -> list[M]:
        with self._news:
            return [message for message in self.heard if isinstance(message, kind)]

    def wait_for(self, kind: type[M]) -> M:
        """The first message of ``kind`` the worker sent, waiting (bounded) for it."""
        with self._news:
            assert self._news.wait_for(lambda: self.of(kind), HEARD_WAIT), f"no {kind.__name__}"
            return self.of(kind)[0]
