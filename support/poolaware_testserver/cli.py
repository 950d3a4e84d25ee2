"""``python -m poolaware_testserver -- CMD``: run a command against a throwaway server."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from pytest_poolaware.shared.settings import ENV_DSN

from .errors import ServerUnavailable
from .server import postgres_dsn

#: Exit status when no server could be had (a usage problem of the machine, not of CMD).
EXIT_NO_SERVER = 2
#: Exit status when CMD cannot be run, as a shell reports it.
EXIT_NOT_RUNNABLE = 127


def main(argv: list[str] | None = None) -> int:
    """Run a command with ``POOLAWARE_DSN`` pointing at a throwaway server; return its status."""
    parser = argparse.ArgumentParser(
        prog="python -m poolaware_testserver",
        description=f"Run CMD with {ENV_DSN} set, starting a throwaway PostgreSQL "
        f"unless {ENV_DSN} is already set.",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    command: list[str] = parser.parse_args(argv).command
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        parser.error("no command given")
    try:
        with postgres_dsn() as dsn:
            try:
                process = subprocess.Popen(command, env={**os.environ, ENV_DSN: dsn})
            except OSError as exc:
                print(f"error: cannot run {command[0]!r}: {exc}", file=sys.stderr)
                return EXIT_NOT_RUNNABLE
            with process:
                try:
                    status = process.wait()
                except KeyboardInterrupt:
                    # The command got the same Ctrl-C: let it finish before the server goes.
                    status = process.wait()
            # Like a shell: death by signal N is 128 + N.
            return status if status >= 0 else 128 - status
    except ServerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_SERVER
