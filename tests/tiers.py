"""Tests by tier, so the fast ones can run alone (``pytest -m unit``).

* ``unit``: pure. Uses no server and starts no process; the whole tier takes seconds.
* ``db``: a real PostgreSQL (the server fixtures, or a server the test starts itself),
  but no Python program started: so never an inner pytest run.
* ``e2e``: whole programs: pytest runs of xdist (pytester's, or a subprocess of the
  test's own), the demo, the test server's command line, a package build.

tests/conftest.py gives every test its tier from the fixtures it uses; a test that starts
a server or a program by itself says so with a marker (``@pytest.mark.db`` or
``@pytest.mark.e2e``). A declared tier may only be higher than the fixtures make it.
While a test runs, :class:`TierGuard` holds it to its tier: a unit test that asks for a
server fixture, or starts any process, fails loudly, and so does a db test that starts
a Python program. pyproject.toml registers the three markers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest

UNIT: Final = "unit"
DB: Final = "db"
E2E: Final = "e2e"
#: Cheapest first: a test's tier is the highest of those its needs call for.
TIERS: Final = (UNIT, DB, E2E)

#: tests/conftest.py's fixtures that start or use the session's PostgreSQL.
SERVER_FIXTURES: Final = frozenset(
    {"postgres_server", "postgres_dsn", "limited_role", "secret_role"}
)
#: Fixtures that run pytest (in a subprocess or in this process): pytester's.
RUN_FIXTURES: Final = frozenset({"pytester"})

#: Audit events (``sys.addaudithook``) of a process being started, whichever way.
PROCESS_EVENTS: Final = frozenset(
    {
        "subprocess.Popen",
        "os.system",
        "os.posix_spawn",
        "os.spawn",
        "os.exec",
        "os.fork",
        "os.forkpty",
    }
)
#: Program names that are a Python interpreter (``python``, ``python3.12``) or pytest.
PYTHON_PROGRAMS: Final = ("python", "pytest", "py.test")
#: Shells whose ``-c`` command is looked through to the program it runs.
SHELLS: Final = frozenset({"sh", "bash", "dash"})


#: The session's guard (in the config's stash).
GUARD: Final = pytest.StashKey["TierGuard"]()
#: Each collected test's tier markers, before ``-m`` deselects any (one tier each).
COLLECTED_TIERS: Final = pytest.StashKey[dict[str, list[str]]]()


class TierError(Exception):
    """A test declares a tier its fixtures contradict, or more than one."""


class TierViolation(RuntimeError):
    """A test did what its tier rules out (raised where it happens: the start is refused)."""


def marked_tiers(item: pytest.Item) -> set[str]:
    """The tier markers on a test, its class's and module's included."""
    return {mark.name for mark in item.iter_markers() if mark.name in TIERS}


def derived_tier(fixturenames: Iterable[str]) -> str:
    """The tier the fixtures a test uses call for."""
    names = set(fixturenames)
    if names & RUN_FIXTURES:
        return E2E
    if names & SERVER_FIXTURES:
        return DB
    return UNIT


def tier_of(nodeid: str, fixturenames: Iterable[str], declared: Iterable[str]) -> str:
    """The test's one tier: the one it declares, else the one its fixtures call for.

    A declared tier below the fixtures' would let a server or a pytest run into a faster
    tier, so it is an error, as is declaring two."""
    derived = derived_tier(fixturenames)
    stated = sorted(set(declared), key=TIERS.index)
    if len(stated) > 1:
        raise TierError(f"{nodeid} is marked with several tiers: {', '.join(stated)}")
    if not stated:
        return derived
    if TIERS.index(stated[0]) < TIERS.index(derived):
        raise TierError(
            f"{nodeid} is marked {stated[0]}, but its fixtures make it {derived} "
            "(a server fixture is db at least; pytester is e2e)"
        )
    return stated[0]


def program_of(event: str, args: tuple[Any, ...]) -> str:
    """The program a process start (one of ``PROCESS_EVENTS``) runs, a shell's ``-c``
    command looked through to its first word."""
    if event in ("os.fork", "os.forkpty"):
        return sys.executable  # the child goes on running this Python
    if event == "os.system":
        return first_word(os.fsdecode(args[0]))
    if event == "os.spawn":  # (mode, path, args, env)
        return os.fsdecode(args[1])
    if event != "subprocess.Popen":  # os.exec, os.posix_spawn: (path, args, env)
        return os.fsdecode(args[0])
    # (executable, args, cwd, env), the args a list by now (a shell's included)
    argv = [os.fsdecode(word) for word in args[1]]
    program = os.fsdecode(args[0]) if args[0] else argv[0]
    if Path(program).name in SHELLS and argv[1:2] == ["-c"] and len(argv) > 2:
        return first_word(argv[2])
    return program


def first_word(command: str) -> str:
    words = command.split()
    return words[0] if words else ""


def runs_python(event: str, args: tuple[Any, ...]) -> bool:
    """Whether a process start runs a Python interpreter or pytest."""
    program = program_of(event, args)
    return program == sys.executable or Path(program).name.startswith(PYTHON_PROGRAMS)


@dataclass
class TierGuard:
    """Holds the running test to its tier (one per session, in the config's stash).

    ``audit`` is installed with ``sys.addaudithook`` (which cannot be undone): it does
    nothing outside a test, so it outlives the session harmlessly.
    """

    #: The running test and its tier (None between tests).
    test: str | None = None
    tier: str | None = None
    #: What the running test did against its tier, for its teardown to fail on (the
    #: refused start may have been caught by the test's own code).
    broken: list[str] = field(default_factory=list)

    def enter(self, test: str, tier: str) -> None:
        self.test, self.tier, self.broken = test, tier, []

    def leave(self) -> list[str]:
        """End the test: what it did against its tier."""
        broken, self.test, self.tier, self.broken = self.broken, None, None, []
        return broken

    def refuse(self, why: str) -> TierViolation:
        self.broken.append(why)
        return TierViolation(f"{self.test} is a {self.tier} test, but {why}")

    def server_requested(self, fixture: str) -> None:
        """Called by each server fixture before it starts or hands out anything."""
        if self.tier == UNIT:
            raise self.refuse(
                f"it asked for the server fixture {fixture!r}: unit tests use no server "
                "(mark it db, or leave the server out)"
            )

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        """The audit hook: refuses the process starts the running test's tier rules out."""
        if self.tier is None or event not in PROCESS_EVENTS or self.tier == E2E:
            return
        if self.tier == UNIT:
            raise self.refuse(
                f"it started a process ({event} {args[:2]!r}): unit tests start none "
                "(mark it db for a server it starts, e2e for a program it runs)"
            )
        if runs_python(event, args):
            raise self.refuse(
                f"it started a Python program ({args[:2]!r}): db tests run no pytest "
                "and no other Python program (mark it e2e)"
            )
