"""The worker's agent (``worker.agent``) between and inside items: when the controller asks
for idle connections back, who gives them back. Pure: the controller's end of the side
channel is played by the test (``loopback``); the go, the measures and the reruns of real
runs are in test_plugin.py and test_faults.py."""

from __future__ import annotations

from loopback import ControllerEnd

from pytest_poolaware.shared.protocol import Counts, ReleaseIdle
from pytest_poolaware.worker.agent import WorkerAgent


def agent_of(controller: ControllerEnd) -> WorkerAgent:
    return WorkerAgent(controller.link(), budget=15, gate_timeout=1.0, retry_on_limit=True)


def test_waiting_for_work_a_release_is_carried_out_at_once_on_a_thread() -> None:
    """The main thread sits in xdist's loop, where it cannot hear the ask: the counts
    that answer it come anyway."""
    controller = ControllerEnd()
    agent = agent_of(controller)
    agent.idle.waiting_for_work()
    controller.deliver(ReleaseIdle())
    assert controller.wait_for(Counts).released
    assert not agent.link.release_asked  # taken: not carried out twice


def test_inside_an_item_a_release_is_left_to_the_main_thread_until_the_item_ends() -> None:
    controller = ControllerEnd()
    agent = agent_of(controller)
    agent.idle.busy()
    controller.deliver(ReleaseIdle())
    assert controller.of(Counts) == []  # no thread was started to release meanwhile
    assert agent.link.release_asked
    agent.idle.waiting_for_work()  # the item ended without taking the ask: done now
    assert controller.wait_for(Counts).released
