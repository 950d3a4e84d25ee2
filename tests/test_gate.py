"""The connect gate (``worker.gate``): what a connect meets, inside a test and outside any,
when the controller grants, refuses, keeps it waiting or has gone. Pure: the controller's
end of the side channel is played by the test (``loopback``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from loopback import ControllerEnd

from pytest_poolaware.shared.clock import monotonic
from pytest_poolaware.shared.protocol import Answer, Note, RoomRequest, decode
from pytest_poolaware.worker.gate import ORPHANED, STARTUP, ConnectGate, Overlap
from pytest_poolaware.worker.meter import BudgetRefused, ControllerGone, PoolMeter

#: Long enough for no grant to be missed; short enough that a wait nobody answers ends.
TIMEOUT = 0.05
#: As the controller tells a worker whose budget is the server's own room.
ROOM = (16, "role acc_app CONNECTION LIMIT 16")


def gate_of(
    controller: ControllerEnd,
    room: tuple[int, str] | None = None,
    clock: Callable[[], float] = monotonic,
) -> ConnectGate:
    released: list[bool] = []

    async def release_async() -> None:
        released.append(True)

    return ConnectGate(
        controller.link(),
        PoolMeter.unbound(),
        budget=15,
        gate_timeout=TIMEOUT,
        room=room,
        release=lambda: released.append(True),
        release_async=release_async,
        clock=clock,
    )


def test_a_granted_connect_inside_a_test_names_the_test_and_counts_the_wait() -> None:
    controller = ControllerEnd(Answer.GRANTED)
    gate = gate_of(controller)
    gate.phase = None  # inside a test
    gate.begin_item(7)
    gate.wait(background=False)
    assert controller.of(RoomRequest) == [RoomRequest(1, None, 7, background=False)]
    assert gate.waited > 0
    assert controller.of(Note) == []


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> bool:
        self.now += seconds
        return True


class SlowController(ControllerEnd):
    """Grants every request for room after ``delay`` seconds of ``clock``."""

    def __init__(self, clock: Clock, delay: float) -> None:
        super().__init__(Answer.GRANTED)
        self.clock, self.delay = clock, delay

    def send(self, wire: Any) -> None:
        if isinstance(decode(wire), RoomRequest):
            self.clock.advance(self.delay)
        super().send(wire)


def test_an_item_s_wait_for_its_go_and_its_time_at_the_gate_are_counted_apart() -> None:
    """The lower bound takes the time at the gate out of the test's duration; the wait
    for the go is before its start."""
    clock = Clock()
    controller = SlowController(clock, delay=1.5)
    gate = gate_of(controller, clock=clock)
    gate.phase = None
    gate.begin_item(3)
    gate.waiting_for_go(lambda: clock.advance(2.0))
    gate.begin_attempt()
    gate.wait(background=False)
    assert (gate.go_waited, gate.gate_waited, gate.waited) == (2.0, 1.5, 3.5)
    # Rerun alone: the first attempt's time at the gate stays the item's, not the rerun's.
    gate.waiting_for_go(lambda: clock.advance(1.0))
    gate.begin_attempt()
    assert (gate.go_waited, gate.gate_waited, gate.waited) == (3.0, 0.0, 4.5)
    gate.begin_item(4)
    assert (gate.go_waited, gate.gate_waited, gate.waited) == (0.0, 0.0, 0.0)


def test_threads_waiting_at_the_gate_at_once_hold_the_test_back_once() -> None:
    clock = Clock()
    overlap = Overlap(clock)
    overlap.enter()
    clock.advance(1.0)
    overlap.enter()  # a second thread, while the first still waits
    clock.advance(2.0)
    overlap.leave()
    clock.advance(1.0)
    overlap.leave()
    assert (overlap.item, overlap.attempt) == (4.0, 4.0)
    # A wait under way when the rerun begins: its part before goes to the item only.
    overlap.enter()
    clock.advance(1.0)
    overlap.restart(item=False)
    clock.advance(0.5)
    overlap.leave()
    assert (overlap.item, overlap.attempt) == (5.5, 0.5)


def test_a_refused_connect_inside_a_test_gives_way_to_be_rerun() -> None:
    gate = gate_of(ControllerEnd(Answer.REFUSED))
    gate.phase = None
    with pytest.raises(BudgetRefused, match="this one gives way and is rerun alone"):
        gate.wait(background=False)


def test_outside_any_test_a_connect_is_never_refused_and_a_long_wait_is_a_note() -> None:
    refusing = gate_of(ControllerEnd(Answer.REFUSED))
    refusing.wait(background=False)  # at start-up: the worker's own, delayed, never refused
    silent = ControllerEnd(answer=None)
    gate = gate_of(silent)
    gate.wait(background=False)
    assert silent.of(RoomRequest)[0].item == -1  # not any test's
    assert silent.wait_for(Note).text == (
        f"waited {TIMEOUT:g}s for connection budget at {STARTUP} (outside any test); "
        "connecting anyway"
    )
    assert gate.take_waited() >= TIMEOUT
    assert gate.take_waited() == 0.0


def test_a_test_kept_waiting_past_the_server_s_own_room_gives_way() -> None:
    silent = ControllerEnd(answer=None)
    gate = gate_of(silent, room=ROOM)
    gate.phase = None
    with pytest.raises(BudgetRefused, match="within the server's room"):
        gate.wait(background=False)
    assert "the test gave way" in silent.wait_for(Note).text


def test_a_test_kept_waiting_on_a_configured_budget_connects_anyway() -> None:
    silent = ControllerEnd(answer=None)
    gate = gate_of(silent)
    gate.phase = None
    gate.wait(background=False)
    note = silent.wait_for(Note)
    assert note.text.endswith("connecting anyway")
    # It names the request it gave up on: the controller judges that wait.
    assert note.request == silent.of(RoomRequest)[0].request > 0


def test_once_the_controller_has_gone_no_connection_is_opened() -> None:
    controller = ControllerEnd(answer=None)
    gate = gate_of(controller)
    controller.close()
    with pytest.raises(ControllerGone, match=ORPHANED):
        gate.wait(background=False)


def test_after_the_session_connects_go_through_without_asking() -> None:
    controller = ControllerEnd(answer=None)
    gate = gate_of(controller)
    gate.gated = False
    gate.wait(background=False)
    assert controller.heard == []
