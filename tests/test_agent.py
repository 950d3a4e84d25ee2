"""The worker's agent (``worker.agent``) between and inside items: when the controller asks
for idle connections back, who gives them back. Pure: the controller's end of the side
channel is played by the test (``loopback``); the go, the measures and the reruns of real
runs are in test_plugin.py and test_faults.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from loopback import ControllerEnd

from pytest_poolaware.shared.link import GoWait
from pytest_poolaware.shared.protocol import Counts, Goes, ReleaseIdle
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


def test_a_wait_for_a_go_ends_with_the_go_the_controller_gone_or_the_bound() -> None:
    controller = ControllerEnd()
    link = controller.link()
    assert link.wait_go(3, lambda: None, 0.05) is GoWait.TIMED_OUT
    controller.deliver(Goes((3,)))
    assert link.wait_go(3, lambda: None, 0.05) is GoWait.GO
    controller.close()
    assert link.wait_go(4, lambda: None, 60.0) is GoWait.GONE


WEDGED_CONFTEST = """
from loopback import ControllerEnd
from pytest_poolaware.worker.agent import WorkerAgent


def pytest_configure(config):
    # A controller that hears everything and answers nothing: no go ever comes.
    agent = WorkerAgent(
        ControllerEnd(answer=None).link(),
        budget=15,
        gate_timeout=0.05,
        go_timeout=0.2,
        retry_on_limit=True,
    )
    config.pluginmanager.register(agent, "poolaware-worker")
"""


def test_a_test_whose_go_never_comes_fails_without_running(pytester: pytest.Pytester) -> None:
    """A controller wedged by a fault never answers: each test fails after the bound
    (the first after the go timeout, the next ones after a gate timeout), none runs,
    and the run ends."""
    pytester.syspathinsert(Path(__file__).parent)
    pytester.makeconftest(WEDGED_CONFTEST)
    pytester.makepyfile(
        "ran = []\ndef test_one():\n    ran.append(1)\ndef test_two():\n    ran.append(2)\n"
    )
    result = pytester.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*waited 0.2s for the controller's go to start this test*"])
    result.stdout.fnmatch_lines(["*waited 0.05s for the controller's go to start this test*"])
