"""What earlier runs measured per test (peak connections, duration), kept in pytest's cache."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

#: Directory in pytest's cache (``--cache-clear`` forgets it like any cache entry) and
#: the file in it. Our own file rather than ``cache.get``, which hides a corrupt file.
CACHE_DIR: Final = "poolaware"
HISTORY_FILE: Final = "history.json"
SCHEMA: Final = 1


@dataclass(frozen=True)
class Measure:
    #: Peak connections checked out at once, as trusted (None: no trusted sighting yet).
    need: int | None
    duration: float  # seconds
    #: A higher need seen once, not trusted until a later run sees more than ``need`` too.
    pending: int | None = None


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

    def record(self, nodeid: str, need: int, duration: float, *, contended: bool = False) -> None:
        """Learn what one attempt of a test held at once.

        A need that goes down (or stays) is trusted at once: the budget and the connect
        gate protect the next run if it was an accident. A need that jumps is only a
        ``pending`` sighting until a later run sees more than the trusted need as well;
        it is then trusted at the smaller of the two sightings. An attempt that was
        ``contended`` (refused a connection, rerun, held back by another run) may have
        counted connections that were not its own at once: it never raises a trusted
        need, and for a test with none it counts only as a first sighting.
        """
        old = self._entries.get(nodeid)
        trusted, pending = (old.need, old.pending) if old else (None, None)
        if trusted is not None and need <= trusted:
            self._entries[nodeid] = Measure(need, duration)
        elif pending is not None and (trusted is None or not contended):
            self._entries[nodeid] = Measure(min(pending, need), duration)
        elif trusted is None and not contended:
            self._entries[nodeid] = Measure(need, duration)
        else:
            seen = need if pending is None else min(pending, need)
            self._entries[nodeid] = Measure(trusted, duration, seen)

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
                nodeid: _entry(m)
                for nodeid, m in self._entries.items()
                if wanted is None or nodeid in wanted
            },
        }

    @classmethod
    def load(cls, directory: Path) -> History:
        """From ``directory`` (pytest's cache gives it: ``cache.mkdir(CACHE_DIR)``)."""
        path = directory / HISTORY_FILE
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

    def save(self, directory: Path, keep: Iterable[str] | None = None) -> None:
        """Write atomically, so an interrupted run never leaves a half-written file."""
        path = directory / HISTORY_FILE
        partial = path.with_suffix(".tmp")
        # Compact: with ``indent`` json falls back to its pure-Python encoder, which costs
        # a big suite a noticeable share of its run's end.
        text = json.dumps(self.to_json(keep), separators=(",", ":"))
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)


def _entry(measure: Measure) -> list[Any]:
    """``[need, duration]``, or ``[need, duration, pending]`` with a pending sighting."""
    entry: list[Any] = [measure.need, round(measure.duration, 6)]
    return entry if measure.pending is None else [*entry, measure.pending]


def _count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


def _measure(value: Any) -> Measure | None:
    if not isinstance(value, list) or len(value) not in (2, 3):
        return None
    need, duration, *rest = value
    pending = rest[0] if rest else None
    if not (_count(need) or (need is None and pending is not None)):
        return None
    if pending is not None and not _count(pending):
        return None
    if isinstance(duration, bool) or not isinstance(duration, (int, float)):
        return None
    if not math.isfinite(duration) or duration < 0:
        return None
    return Measure(need, float(duration), pending)
