"""Roles with connection limits: the shape of the servers the scheduler is built for."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Final

import psycopg
from psycopg import sql

from pytest_poolaware.shared.dsn import with_credentials

#: Advisory lock key held while creating or dropping roles ("poolawar" in ASCII).
ROLE_LOCK_KEY: Final = 0x706F6F6C61776172


@contextlib.contextmanager
def _role_lock(dsn: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """A transaction that has the role lock: concurrent GRANTs on one database fail otherwise."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (ROLE_LOCK_KEY,))
        yield conn


def create_role(
    dsn: str, role: str, *, connection_limit: int | None = None, password: str | None = None
) -> str:
    """Create (or reset) a LOGIN non-superuser role and return a DSN that logs in as it.

    The role gets ALL privileges on the DSN's database and on its ``public`` schema, so it
    can create tables there without owning the database. ``connection_limit=None`` means
    unlimited; an existing role is altered to match, so calling this twice is harmless.
    """
    options = sql.SQL(
        "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE CONNECTION LIMIT {limit} PASSWORD {password}"
    ).format(
        limit=sql.Literal(-1 if connection_limit is None else connection_limit),
        password=sql.Literal(password),
    )
    name = sql.Identifier(role)
    with _role_lock(dsn) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        verb = sql.SQL("ALTER" if exists else "CREATE")
        conn.execute(sql.SQL("{} ROLE {} WITH {}").format(verb, name, options))
        database = sql.Identifier(conn.info.dbname)
        conn.execute(sql.SQL("GRANT ALL ON DATABASE {} TO {}").format(database, name))
        conn.execute(sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(name))
    return with_credentials(dsn, role, password)


def drop_role(dsn: str, role: str) -> None:
    """Disconnect and drop a role made by :func:`create_role`, with what it owns in the DSN's DB."""
    name = sql.Identifier(role)
    with _role_lock(dsn) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
            return
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        conn.execute(sql.SQL("DROP OWNED BY {}").format(name))
        conn.execute(sql.SQL("DROP ROLE {}").format(name))
