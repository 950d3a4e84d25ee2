"""Which errors mean the server had no connection slot left, whatever driver raised them
and however they were wrapped. The worker needs this to rerun a refused test; it lives
here so a worker does not load the server code to ask."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

#: PostgreSQL's SQLSTATE for "too many clients" / "too many connections for role|database".
TOO_MANY_CONNECTIONS: Final = "53300"
_LIMIT_TEXT: Final = re.compile(
    r"too many (clients|connections)|remaining connection slots are reserved", re.IGNORECASE
)


def is_connection_limit_error(exc: BaseException) -> bool:
    """Whether the server refused a connection for lack of slots (any driver, any wrapping)."""
    for error in error_chain(exc):
        if getattr(error, "sqlstate", None) == TOO_MANY_CONNECTIONS:
            return True
        if getattr(error, "pgcode", None) == TOO_MANY_CONNECTIONS:
            return True
        if _LIMIT_TEXT.search(str(error)):
            return True
    return False


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """An error, its causes and contexts, and what a wrapper (SQLAlchemy) holds."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        todo.extend([error.__cause__, error.__context__, getattr(error, "orig", None)])


def first_line(exc: BaseException) -> str:
    """An error in one line, for a note."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
