"""Every connect's wait judged on the controller (``gate_watch``): a wait the budget had
room for is a fault with its cause; a wait for a full budget is not. The watch alone,
then through the side channel: the workers' messages into the controller's end, the
dispatcher reading them as the run does."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace
from typing import Any

from inner import free_port
from xdist.remote import Producer

from pytest_poolaware.budget import RunBudget
from pytest_poolaware.dispatch import Dispatcher, RunRecord
from pytest_poolaware.gate_watch import WAIT_WITH_ROOM, GateWatch
from pytest_poolaware.planning.core import Planner
from pytest_poolaware.reporting.findings import Stall
from pytest_poolaware.server.learning import HELD_FOR_FIRST, HELD_FOR_ROOM, ServerLearning
from pytest_poolaware.shared.link import ControllerLink
from pytest_poolaware.shared.protocol import (
    Answer,
    ControllerMessage,
    Counts,
    Note,
    RequestAnswer,
    RoomRequest,
    ServerSeen,
    WorkerMessage,
    decode,
)

#: Longer than a wait with room may last.
LONG = WAIT_WITH_ROOM + 1.0
#: Bound on waiting for the server's reading (a port nothing listens on: it fails at once).
READ_WAIT = 60.0


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def watch_of(clock: Clock) -> tuple[GateWatch[str], list[Stall]]:
    stalls: list[Stall] = []
    return GateWatch(stalls, str, clock=clock), stalls


def test_a_request_held_while_the_server_is_read_and_granted_at_once_is_a_fault() -> None:
    clock = Clock()
    watch, stalls = watch_of(clock)
    request = RoomRequest(1, item=4)
    watch.arrived("gw1", request, at=clock.now)
    watch.held("gw1", 1, HELD_FOR_ROOM, room=True)
    clock.now += LONG
    watch.arrived("gw1", request, at=None)  # handed back once the room was read
    watch.considered("gw1", 1, granted=True)
    assert stalls == [Stall("gw1", 4, LONG, HELD_FOR_ROOM)]
    assert watch.gave_up("gw1", 1)  # its worker's note on it is the same fault, said once
    assert len(stalls) == 1


def test_a_request_read_late_and_granted_at_once_is_a_fault_of_the_controller() -> None:
    clock = Clock()
    watch, stalls = watch_of(clock)
    watch.arrived("gw0", RoomRequest(3), at=clock.now - LONG)  # it lay in the inbox
    watch.considered("gw0", 3, granted=True)
    (stall,) = stalls
    assert (stall.worker, stall.item, stall.waited) == ("gw0", -1, LONG)
    assert stall.cause.startswith(f"the controller read the request {LONG:.1f}s after it came")


def test_waits_for_a_full_budget_short_waits_and_reruns_are_no_fault() -> None:
    clock = Clock()
    watch, stalls = watch_of(clock)
    watch.arrived("gw0", RoomRequest(1), at=clock.now)
    watch.considered("gw0", 1, granted=False)  # the planner keeps it for room
    watch.arrived("gw1", RoomRequest(1), at=clock.now)
    watch.held("gw1", 1, HELD_FOR_ROOM, room=False)  # no room then either
    watch.arrived("gw2", RoomRequest(1, want=15), at=clock.now)  # a rerun waits to drain
    watch.arrived("gw3", RoomRequest(1), at=clock.now)
    clock.now += LONG
    watch.considered("gw1", 1, granted=False)
    watch.considered("gw2", 1, granted=True)
    assert not watch.gave_up("gw0", 1)
    assert not watch.gave_up("gw1", 1)
    clock.now -= LONG - WAIT_WITH_ROOM / 2
    watch.considered("gw3", 1, granted=True)  # half the limit: the round trip's moment
    assert stalls == []


def test_a_worker_giving_up_on_a_request_held_with_room_is_a_fault_at_once() -> None:
    clock = Clock()
    watch, stalls = watch_of(clock)
    watch.arrived("gw1", RoomRequest(2, item=7), at=clock.now)
    watch.held("gw1", 2, HELD_FOR_FIRST, room=True)
    clock.now += LONG
    assert watch.gave_up("gw1", 2)
    assert stalls == [Stall("gw1", 7, LONG, HELD_FOR_FIRST, gave_up=True)]
    clock.now += LONG
    watch.arrived("gw1", RoomRequest(2, item=7), at=None)  # granted later: said once
    watch.considered("gw1", 2, granted=True)
    assert len(stalls) == 1


# -- through the side channel ------------------------------------------------------------------


class Channel:
    """The controller's end of one worker's side channel: the test sends what the worker
    would; what the controller sends back is kept."""

    def __init__(self) -> None:
        self.received: list[ControllerMessage] = []
        self._callback: Any = None

    def setcallback(self, callback: Any, endmarker: object = None) -> None:
        self._callback = callback

    def isclosed(self) -> bool:
        return False

    def send(self, wire: object) -> None:  # from the controller
        message = decode(wire)
        assert not isinstance(message, WorkerMessage)
        self.received.append(message)

    def worker_sends(self, message: WorkerMessage) -> None:
        self._callback(message.to_wire())

    def answers(self) -> list[tuple[int, Answer]]:
        return [(m.request, m.answer) for m in self.received if isinstance(m, RequestAnswer)]


class Node:
    """A worker as the dispatcher sees it: its gateway's id and spec."""

    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name, spec=SimpleNamespace(popen=True))


class Run:
    """A controller learning the server (no DSN), its dispatcher reading two workers'
    side channels on a clock the test moves."""

    def __init__(self, budget: int = 15) -> None:
        self.clock = Clock()
        self.record = RunRecord()
        inbox: queue.SimpleQueue[tuple[Any, WorkerMessage]] = queue.SimpleQueue()
        self.read = threading.Event()
        self.budget: RunBudget[Any] = RunBudget(budget, "configured")
        self.budget.learn_with(
            ServerLearning(None, inbox, self.read.set, lambda found, dsn, login: budget)
        )
        self.nodes = [Node("gw0"), Node("gw1")]
        self.channels = [Channel(), Channel()]
        links = {
            n: ControllerLink(c, n, inbox, lambda n: None, clock=self.clock)  # type: ignore[arg-type]
            for n, c in zip(self.nodes, self.channels, strict=True)
        }
        self.dispatcher = Dispatcher(
            Planner(budget),
            Producer("poolaware", enabled=False),
            budget=self.budget,
            links=links,
            inbox=inbox,
            joined=set(),
            record=self.record,
            on_collected=lambda node, message: None,
            clock=self.clock,
        )

    def send(self, worker: int, message: WorkerMessage) -> None:
        self.channels[worker].worker_sends(message)

    def drain(self) -> None:
        self.dispatcher.drain()


def test_a_connect_held_while_the_server_is_learned_then_granted_is_reported_as_a_fault() -> None:
    run = Run()
    run.send(0, RoomRequest(1, item=-1))
    run.send(1, RoomRequest(1, item=-1))
    run.drain()
    assert (run.channels[0].answers(), run.channels[1].answers()) == ([(1, Answer.GRANTED)], [])
    run.clock.now += LONG  # the first connection teaches the server late
    seen = ServerSeen("127.0.0.1", free_port(), "app", "acc_app", None, "psycopg", 11)
    run.send(0, seen)
    run.drain()
    assert run.read.wait(READ_WAIT)  # nothing listens there: read (and failed) at once
    run.drain()
    assert run.channels[1].answers() == [(1, Answer.GRANTED)]
    assert run.record.stalls == [Stall("gw1", -1, LONG, HELD_FOR_FIRST)]


def test_a_worker_giving_up_while_held_is_a_fault_not_a_wait_for_the_budget() -> None:
    run = Run()
    run.send(0, RoomRequest(1, item=-1))
    run.send(1, RoomRequest(1, item=-1))
    run.drain()
    run.clock.now += LONG
    run.send(1, Note("waited 2s for connection budget; connecting anyway", request=1))
    run.drain()
    assert run.record.stalls == [Stall("gw1", -1, LONG, HELD_FOR_FIRST, gave_up=True)]
    assert run.record.notes == []  # not said as a wait for the budget
    run.send(0, ServerSeen("127.0.0.1", free_port(), "app", "acc_app", None, "psycopg", 11))
    run.drain()
    assert run.read.wait(READ_WAIT)
    run.drain()  # the held request comes back once the server is read: withdrawn
    assert run.channels[1].answers() == []


def test_a_connect_kept_waiting_by_a_full_budget_is_no_fault() -> None:
    run = Run(budget=1)
    run.send(0, RoomRequest(1, item=-1))
    run.drain()  # the one that passes while the server is learned
    run.send(0, Counts(open=1, idle=1, version=1))  # idle: asked back when room is wanted
    run.send(0, ServerSeen("127.0.0.1", free_port(), "app", "acc_app", None, "psycopg", 11))
    run.drain()
    assert run.read.wait(READ_WAIT)
    run.drain()  # learned (nothing could be read): the budget of 1 stays, held by gw0
    run.send(1, RoomRequest(1, item=-1))
    run.drain()
    assert run.channels[1].answers() == []  # gw0 is asked for its idle connection back
    run.clock.now += LONG
    run.send(1, Note("waited 2s for connection budget; connecting anyway", request=1))
    run.send(0, Counts(open=0, idle=0, released=True, version=2))
    run.drain()
    assert run.record.stalls == []
    assert run.record.notes == ["[gw1] waited 2s for connection budget; connecting anyway"]
    # gw1 connected anyway: its request is withdrawn, never granted a second room later.
    assert run.channels[1].answers() == []
    assert run.dispatcher.planner.statistics().committed == 0
