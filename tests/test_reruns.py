"""Which attempts failed on a connection limit, and whether each is rerun alone
(``worker.reruns``). Pure: the items are this test's own."""

from __future__ import annotations

import pytest
from loopback import ControllerEnd

from pytest_poolaware.shared.protocol import Note
from pytest_poolaware.worker.meter import BudgetRefused
from pytest_poolaware.worker.reruns import (
    RERUN_DEADLOCK,
    RERUN_SERVER,
    LimitFailures,
)


class TooManyConnections(Exception):
    """What the server says when its slots are taken (SQLSTATE 53300), as drivers raise it."""

    sqlstate = "53300"


def failed(when: str, error: BaseException) -> pytest.CallInfo[None]:
    def fail() -> None:
        raise error

    return pytest.CallInfo.from_call(fail, when=when)  # type: ignore[arg-type]


def test_a_test_the_gate_refused_is_rerun_to_break_the_wait(request: pytest.FixtureRequest) -> None:
    limits = LimitFailures(ControllerEnd().link())
    limits.note_report(request.node, failed("call", BudgetRefused("too many connections")))
    assert limits.take(request.node, retry=True) == (False, RERUN_DEADLOCK)
    assert limits.take(request.node, retry=True) == (False, "")  # used up


def test_a_test_the_server_refused_is_rerun_and_its_measures_are_contended(
    request: pytest.FixtureRequest,
) -> None:
    limits = LimitFailures(ControllerEnd().link())
    limits.note_report(request.node, failed("call", TooManyConnections("sorry")))
    assert limits.take(request.node, retry=False) == (True, "")  # rerun off: not rerun
    assert limits.take(request.node, retry=True) == (True, RERUN_SERVER)


def test_other_failures_are_not_rerun(request: pytest.FixtureRequest) -> None:
    limits = LimitFailures(ControllerEnd().link())
    limits.note_report(request.node, failed("call", AssertionError("a plain failure")))
    assert limits.take(request.node, retry=True) == (False, "")


def test_a_broader_fixture_that_failed_on_a_limit_reruns_none_of_its_tests(
    request: pytest.FixtureRequest,
) -> None:
    controller = ControllerEnd()
    limits = LimitFailures(controller.link())
    error = TooManyConnections('FATAL: too many connections for role "app"\nDETAIL: more')
    limits.note_fixture(error, "django_db_setup", "session")
    limits.note_report(request.node, failed("setup", error))  # pytest re-raises it to each test
    assert limits.take(request.node, retry=True) == (False, "")
    assert controller.of(Note) == [
        Note(
            "the session-scoped fixture 'django_db_setup' failed on a connection limit "
            '(FATAL: too many connections for role "app"); its tests were not rerun alone: '
            "each rerun would repeat that setup or fail on its error"
        )
    ]
