"""Items as a run's report holds them (``reporting.runstats.ItemFacts``), for the tests of
what is made of them."""

from __future__ import annotations

from pytest_poolaware.planning.core import Lane
from pytest_poolaware.reporting.runstats import ItemFacts
from pytest_poolaware.shared.markers import Markers


def facts(
    nodeid: str,
    *,
    need: int | None = 0,
    duration: float = 1.0,
    serial: bool = False,
    parallel: bool = False,
    lane: Lane | None = None,
) -> ItemFacts:
    return ItemFacts(
        nodeid,
        Markers(serial, parallel),
        lane or (Lane.SERIAL if serial else Lane.FANOUT),
        worker="gw0",
        start=0.0,
        end=duration,
        duration=None if need is None else duration,
        need=need,
        peak_open=need,
        waited=0.0,
    )
