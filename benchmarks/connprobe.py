"""pytest plugin for the benchmarks (``-p connprobe``): each test's peak checked-out connections.

The lower bound needs ``c``, the most connections a test holds at once. SQLAlchemy's
class-level ``Pool`` events see every pool in the process (sync engines, and async ones
through their sync pool), so no suite code changes. The peak and the test's lane marker
are written as junitxml properties, so the harness reads ``p`` and ``c`` from one file.
Kept apart from the project's plugin on purpose: it measures, it does not schedule.
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from typing import Any, Final

import pytest
from sqlalchemy import event
from sqlalchemy.pool import Pool

#: junitxml property names the harness reads back.
PEAK_PROPERTY: Final = "bench_peak_connections"
SERIAL_PROPERTY: Final = "bench_serial_only"
SERIAL_MARKER: Final = "serial_only"


class _Meter:
    """Connections checked out right now in this process, and the peak since ``restart``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0

    def checkout(self, *_: Any) -> None:
        with self._lock:
            self.current += 1
            self.peak = max(self.peak, self.current)

    def checkin(self, *_: Any) -> None:
        with self._lock:
            self.current = max(0, self.current - 1)

    def restart(self) -> None:
        with self._lock:
            self.peak = self.current


_METER: Final = _Meter()


def pytest_configure(config: pytest.Config) -> None:
    if not event.contains(Pool, "checkout", _METER.checkout):
        event.listen(Pool, "checkout", _METER.checkout)
        event.listen(Pool, "checkin", _METER.checkin)


def pytest_unconfigure(config: pytest.Config) -> None:
    if event.contains(Pool, "checkout", _METER.checkout):
        event.remove(Pool, "checkout", _METER.checkout)
        event.remove(Pool, "checkin", _METER.checkin)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, None]:
    _METER.restart()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, object, None]:
    # junitxml takes a test's properties from its teardown report: add them before it is made.
    if call.when == "teardown":
        item.user_properties.append((PEAK_PROPERTY, _METER.peak))
        serial = item.get_closest_marker(SERIAL_MARKER) is not None
        item.user_properties.append((SERIAL_PROPERTY, int(serial)))
    yield
