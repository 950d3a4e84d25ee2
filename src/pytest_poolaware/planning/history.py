"""What earlier runs measured per test (peak connections, duration), kept in pytest's
cache and, when asked, in a file a team commits or caches (``--poolaware-history``)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
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


@dataclass(frozen=True)
class Selection:
    """How much of the suite a run collected, as pytest says: anything that narrowed it
    means the tests it did not collect may still exist, so their learned data is kept."""

    #: The run's arguments as absolute paths (a node id's file for ``file.py::test``),
    #: and the suite's roots: the configured ``testpaths``, else the rootdir.
    paths: tuple[Path, ...]
    suite: tuple[Path, ...]
    #: An argument named tests within a file (``file.py::test``).
    node_ids: bool = False
    #: ``--lf``: only the last failures, of the files that had some.
    last_failed: bool = False
    keyword: str = ""
    markexpr: str = ""
    #: Items collected, then left out (deselected, or dropped by a plugin).
    deselected: int = 0
    #: Files whose tests were not collected (an error, or skipped whole).
    uncollected: int = 0

    @property
    def whole_suite(self) -> bool:
        """Whether the run collected every test the suite has."""
        narrowed = (
            self.node_ids
            or self.last_failed
            or self.keyword
            or self.markexpr
            or self.deselected
            or self.uncollected
        )
        return not narrowed and covers(self.paths, self.suite)


def covers(paths: Sequence[Path], roots: Sequence[Path]) -> bool:
    """Whether every root lies within one of ``paths`` (absolute, normalized alike)."""
    return all(any(path == root or path in root.parents for path in paths) for root in roots)


class History:
    """Per node id measures; loaded on the controller at start, saved at the end."""

    def __init__(self, entries: Mapping[str, Measure] | None = None) -> None:
        self._entries: dict[str, Measure] = dict(entries or {})
        self.problems: list[str] = []

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, nodeid: str) -> Measure | None:
        return self._entries.get(nodeid)

    def forget_missing(
        self,
        collection: Iterable[str],
        *,
        whole_suite: bool,
        file_exists: Callable[[str], bool],
    ) -> int:
        """Drop the entries of tests that no longer exist; returns how many.

        A run that collected the whole suite (``Selection.whole_suite``) shows which
        tests exist: the others are gone. Any other run (``--lf``, ``-k``, a path) says
        nothing of the tests it did not collect, so they are kept unless their file is
        gone (``file_exists`` of the node id's path, relative to the rootdir).
        """
        present = set(collection)
        files: dict[str, bool] = {}

        def gone(nodeid: str) -> bool:
            if nodeid in present:
                return False
            if whole_suite:
                return True
            path = nodeid.split("::", 1)[0]
            if path not in files:
                files[path] = file_exists(path)
            return not files[path]

        stale = [nodeid for nodeid in self._entries if gone(nodeid)]
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
    def from_json(cls, data: Any, source: str = "learned data") -> History:
        """Accept what ``to_json`` wrote; anything else is dropped and noted in ``problems``
        (``source`` names the data there)."""
        history = cls()
        if data is None:
            return history
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            history.problems.append(f"{source} has an unknown format; starting cold")
            return history
        tests = data.get("tests")
        if not isinstance(tests, dict):
            history.problems.append(f"{source} has no test table; starting cold")
            return history
        dropped = 0
        for nodeid, value in tests.items():
            measure = _measure(value)
            if measure is None:
                dropped += 1
            else:
                history._entries[str(nodeid)] = measure
        if dropped:
            history.problems.append(f"ignored {dropped} malformed entries in the {source}")
        return history

    def to_json(self) -> dict[str, Any]:
        """Serializable form."""
        return {
            "schema": SCHEMA,
            "tests": {nodeid: _entry(m) for nodeid, m in self._entries.items()},
        }

    def filled_from(self, other: History) -> History:
        """These entries first, ``other``'s for the tests they lack (a team's file over
        pytest's cache); the problems of both."""
        merged = History({**other._entries, **self._entries})
        merged.problems = [*self.problems, *other.problems]
        return merged

    @classmethod
    def load(cls, directory: Path) -> History:
        """From ``directory`` (pytest's cache gives it: ``cache.mkdir(CACHE_DIR)``)."""
        return cls.read(directory / HISTORY_FILE)

    @classmethod
    def read(cls, path: Path) -> History:
        """From the file ``path`` (none: nothing learned yet). A file that cannot be read
        or parsed is a problem, never an error: the run plans without it."""
        history = cls()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return history
        except OSError as exc:  # names the path
            history.problems.append(f"cannot read learned data ({exc}); starting cold")
            return history
        except UnicodeDecodeError:
            history.problems.append(f"learned data in {path} is not UTF-8; starting cold")
            return history
        try:
            data = json.loads(text)
        except ValueError:
            history.problems.append(f"learned data in {path} is not valid JSON; starting cold")
            return history
        return cls.from_json(data, f"learned data in {path}")

    def save(self, directory: Path) -> None:
        """Into pytest's cache. Compact: with ``indent`` json falls back to its pure-Python
        encoder, which costs a big suite a noticeable share of its run's end."""
        _replace(directory / HISTORY_FILE, json.dumps(self.to_json(), separators=(",", ":")))

    def write(self, path: Path) -> None:
        """For a file a team commits or caches: sorted, one test a line, so that its diff
        shows what changed."""
        rows = ",\n".join(
            f"    {json.dumps(nodeid)}: {json.dumps(_entry(measure))}"
            for nodeid, measure in sorted(self._entries.items())
        )
        tests = f"{{\n{rows}\n  }}" if rows else "{}"
        _replace(path, f'{{\n  "schema": {SCHEMA},\n  "tests": {tests}\n}}\n')


def _replace(path: Path, text: str) -> None:
    """Write atomically, so an interrupted run never leaves a half-written file."""
    partial = path.with_name(path.name + ".tmp")
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
