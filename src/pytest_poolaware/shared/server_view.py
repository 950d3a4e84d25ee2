"""What the server-side monitor saw, handed to the reports: a record of its own so the
reports read it without importing the server code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerView:
    """What server-side monitoring saw (``monitor.ServerMonitor``)."""

    peak: int
    samples: int
    scope: str  # which connections were counted, in words
    interval: float
    timeline: tuple[tuple[float, int], ...] = ()
