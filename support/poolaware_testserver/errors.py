"""Why no server could be had: messages meant for the user, never a traceback."""

from __future__ import annotations


class ServerUnavailable(RuntimeError):
    """No throwaway server could be started; the message says what to install or set."""


class PostgresNotFound(ServerUnavailable):
    """No PostgreSQL server programs were found on this machine."""


class PostgresStartError(ServerUnavailable):
    """The throwaway server did not come up; the message ends with its log."""
