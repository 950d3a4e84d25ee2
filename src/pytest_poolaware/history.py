"""What earlier runs measured per test (peak connections, duration), kept in pytest's cache."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import pytest

#: pytest cache key; ``--cache-clear`` forgets it like any other cache entry.
CACHE_KEY: Final = "poolaware/history"
SCHEMA: Final = 1


@dataclass(frozen=True)
class Measure:
    need: int  # peak connections checked out at once
    duration: float  # seconds


class History:
    """Per node id measures; loaded on the controller at start, saved at the end."""

    def __init__(self, entries: Mapping[str, Measure] | None = None) -> None:
        self._entries: dict[str, Measure] = dict(entries or {})
        self.problems: list[str] = []

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, nodeid: str) -> Measure | None:
        return self._entries.get(nodeid)

    def record(self, nodeid: str, need: int, duration: float) -> None:
        self._entries[nodeid] = Measure(need, duration)

    @classmethod
    def from_json(cls, data: Any) -> History:
        """Accept what ``to_json`` wrote; anything else is dropped and noted in ``problems``."""
        history = cls()
        if data is None:
            return history
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            history.problems.append("learned data has an unknown format; starting cold")
            return history
        tests = data.get("tests")
        if not isinstance(tests, dict):
            history.problems.append("learned data has no test table; starting cold")
            return history
        dropped = 0
        for nodeid, value in tests.items():
            measure = _measure(value)
            if measure is None:
                dropped += 1
            else:
                history._entries[str(nodeid)] = measure
        if dropped:
            history.problems.append(f"ignored {dropped} malformed learned entries")
        return history

    def to_json(self, keep: Iterable[str] | None = None) -> dict[str, Any]:
        """Serializable form; ``keep`` limits it to node ids that still exist."""
        wanted = set(keep) if keep is not None else None
        return {
            "schema": SCHEMA,
            "tests": {
                nodeid: [m.need, round(m.duration, 6)]
                for nodeid, m in self._entries.items()
                if wanted is None or nodeid in wanted
            },
        }

    @classmethod
    def load(cls, cache: pytest.Cache) -> History:
        return cls.from_json(cache.get(CACHE_KEY, None))

    def save(self, cache: pytest.Cache, keep: Iterable[str] | None = None) -> None:
        cache.set(CACHE_KEY, self.to_json(keep))


def _measure(value: Any) -> Measure | None:
    if not isinstance(value, list) or len(value) != 2:
        return None
    need, duration = value
    if isinstance(need, bool) or not isinstance(need, int) or need < 0:
        return None
    if isinstance(duration, bool) or not isinstance(duration, (int, float)):
        return None
    if not math.isfinite(duration) or duration < 0:
        return None
    return Measure(need, float(duration))
