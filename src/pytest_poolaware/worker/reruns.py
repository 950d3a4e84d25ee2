"""Attempts that failed on a connection limit, and whether each is run again, alone.

A test refused a connection (by the server, or by the gate to break a wait) is rerun
once, alone, when the rerun is enabled; one that failed in the setup of a fixture broader
than the test is not (``NOT_RERUN_BROAD_SETUP``).
"""

from __future__ import annotations

import gc
import sys
import warnings
from typing import Final

import pytest

from pytest_poolaware.shared.errors import error_chain, is_connection_limit_error
from pytest_poolaware.shared.link import WorkerLink
from pytest_poolaware.shared.protocol import Note
from pytest_poolaware.worker.meter import BudgetRefused

#: Why an item's attempt failed on connections: ``RERUN_DEADLOCK`` or ``RERUN_SERVER``.
_limit_hit_key = pytest.StashKey[str]()
RERUN_DEADLOCK: Final = "gave way to break a wait for connections"
RERUN_SERVER: Final = "the server refused a connection"
#: The attempt failed in the setup of a fixture broader than the test (session, module,
#: class) on a connection limit: a rerun would repeat that setup (pytest-django's
#: ``django_db_setup`` would create its databases again, under a name suffixed twice)
#: or fail on its cached error, for every test that uses it, so none is rerun.
NOT_RERUN_BROAD_SETUP: Final = "in a broader fixture's setup"


def drop_failed_attempt() -> None:
    """Let go of what a failed attempt still holds, so its connections return to the pool.

    Code that opens several connections rarely closes the ones it got when a later one
    fails; pytest keeps the failure's traceback (and so those connections) alive in
    ``sys.last_traceback``. Room for the rerun must not wait for a later collection.
    """
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    with warnings.catch_warnings():
        # SQLAlchemy warns when the collector returns a connection to its pool.
        warnings.simplefilter("ignore")
        gc.collect()


class LimitFailures:
    """What failed on a connection limit in this worker: each item's attempt (in its
    stash), and the fixtures broader than a test (whose tests are not rerun)."""

    def __init__(self, link: WorkerLink) -> None:
        self.link = link
        #: Failures of fixtures broader than a test on a connection limit (by ``id``).
        self._broad: set[int] = set()

    def note_report(self, item: pytest.Item, call: pytest.CallInfo[None]) -> None:
        """Note a connection-limit failure in one phase of an item's attempt."""
        if call.excinfo is None or not is_connection_limit_error(call.excinfo.value):
            return
        failure = call.excinfo.value
        if call.when == "setup" and id(failure) in self._broad:
            item.stash[_limit_hit_key] = NOT_RERUN_BROAD_SETUP
            return
        refused = any(isinstance(e, BudgetRefused) for e in error_chain(failure))
        item.stash[_limit_hit_key] = RERUN_DEADLOCK if refused else RERUN_SERVER

    def note_fixture(self, exc: BaseException, name: str, scope: str) -> None:
        """A fixture broader than a test failed on a connection limit: its tests are not
        rerun one by one; the summary says it once."""
        self._broad.add(id(exc))  # pytest keeps it: re-raised to each test
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.link.send(
            Note(
                f"the {scope}-scoped fixture {name!r} failed on a connection limit "
                f"({first}); its tests were not rerun alone: each rerun would repeat "
                "that setup or fail on its error"
            )
        )

    @staticmethod
    def take(item: pytest.Item, *, retry: bool) -> tuple[bool, str]:
        """After an attempt: whether the server refused it a connection (what the meter
        counted may then include connections the failed attempt's threads still held
        while the test went on), and why it is rerun ("": it is not). With ``retry`` the
        attempt's note is used up."""
        hit = item.stash.get(_limit_hit_key, "")
        contended = hit == RERUN_SERVER
        if not retry or not hit:
            return contended, ""
        del item.stash[_limit_hit_key]
        return contended, "" if hit == NOT_RERUN_BROAD_SETUP else hit
