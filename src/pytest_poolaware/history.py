"""What earlier runs measured per test (peak connections, duration), kept in pytest's cache."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import pytest

#: Directory in pytest's cache (``--cache-clear`` forgets it like any cache entry) and
#: the file in it. Our own file rather than ``cache.get``, which hides a corrupt file.
CACHE_DIR: Final = "poolaware"
HISTORY_FILE: Final = "history.json"
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

    def forget_missing(self, nodeids: Iterable[str]) -> int:
        """Drop entries of tests that no longer exist; returns how many."""
        present = set(nodeids)
        stale = [nodeid for nodeid in self._entries if nodeid not in present]
        for nodeid in stale:
            del self._entries[nodeid]
        return len(stale)

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
            history.problems.append(f"ignored {dropped} malformed entries in the learned data")
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
        path = cache.mkdir(CACHE_DIR) / HISTORY_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            history = cls()
            history.problems.append(f"cannot read learned data ({exc}); starting cold")
            return history
        try:
            data = json.loads(text)
        except ValueError:
            history = cls()
            history.problems.append(f"learned data in {path} is not valid JSON; starting cold")
            return history
        return cls.from_json(data)

    def save(self, cache: pytest.Cache, keep: Iterable[str] | None = None) -> None:
        """Write atomically, so an interrupted run never leaves a half-written file."""
        path = cache.mkdir(CACHE_DIR) / HISTORY_FILE
        partial = path.with_suffix(".tmp")
        # Compact: with ``indent`` json falls back to its pure-Python encoder, which costs
        # a big suite a noticeable share of its run's end.
        text = json.dumps(self.to_json(keep), separators=(",", ":"))
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)


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
