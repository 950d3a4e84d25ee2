"""CPU priority of the workers: the serial lane's worker runs ahead of the fan-out ones.

The serial lane is the run's critical path, and on a machine with fewer cores than
workers every process competes for the CPU: while booting (interpreter, plugins,
conftests) and while running tests. Every worker but the first spawned, which starts
the serial lane, lowers its priority by ``poolaware_fanout_nice``, so the critical path
gets the CPU first; when the cores are idle, niceness changes nothing.

A worker must lower its priority before its conftests' imports, before
``config.workerinput`` exists, so the controller hands the value down the only way that
early: in the environment, from the moment the first worker is spawned until the last
one is (local workers only). Each worker takes it out of its own environment, so the
processes it starts in turn (a nested pytest run) never inherit it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import MutableMapping
from typing import Final

#: Set in the controller's environment only while xdist spawns the workers after the first.
ENV_WORKER_NICE: Final = "POOLAWARE_WORKER_NICE"


def offer_to_workers(niceness: int, environ: MutableMapping[str, str] | None = None) -> None:
    """Controller, once the first worker is spawned: the next ones inherit the offer."""
    env = os.environ if environ is None else environ
    if niceness > 0:
        env[ENV_WORKER_NICE] = str(niceness)


def withdraw(environ: MutableMapping[str, str] | None = None) -> None:
    """Controller, once the last worker is spawned (and at the end, whatever happened)."""
    env = os.environ if environ is None else environ
    env.pop(ENV_WORKER_NICE, None)


def take_in_worker(environ: MutableMapping[str, str] | None = None) -> int:
    """Worker, before its conftests load: the niceness to add (0: none), taken out of the
    environment."""
    env = os.environ if environ is None else environ
    raw = env.pop(ENV_WORKER_NICE, None)
    if raw is None or "PYTEST_XDIST_WORKER" not in env:
        return 0
    try:
        return max(0, int(raw))
    except ValueError:
        return 0


def lower_priority(niceness: int) -> None:
    """Add ``niceness`` to this process's (where the OS has niceness at all)."""
    if niceness > 0 and hasattr(os, "nice"):
        with contextlib.suppress(OSError):  # not permitted here: keep the priority we have
            os.nice(niceness)
