"""Parsers of setting values: what each option, ini key and variable accepts.

Each is a pure ``type=`` parser raising ``argparse.ArgumentTypeError`` (pytest turns that
into a usage error naming the flag); ``parse_setting`` applies one to a value from the ini
or the environment, as a ``ConfigError`` naming the key or variable. The table of options
that uses them is ``options``.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Final, TypeVar

from pytest_poolaware.shared.dsn import mask_dsn

T = TypeVar("T")

#: Where tests without either marker go before their connection needs are known.
UNMARKED_POLICIES: Final = ("parallel", "serial")
#: How each worker's tests are ordered: ``collection`` (as ``--dist load``: each worker in
#: collection order) or ``duration`` (longest module first, across the collection).
ORDERS: Final = ("collection", "duration")
#: ``poolaware_share``: runs against one server share its room through it (``auto``, the
#: default: whenever the plugin has its own connection to the server and no pooler stands
#: in between), or each takes what it finds (``off``).
SHARE_MODES: Final = ("auto", "off")
#: Longest name space accepted (it is hashed into the advisory-lock keys).
MAX_NAMESPACE_LENGTH: Final = 63
#: ``poolaware_monitor`` values that turn server-side monitoring off.
MONITOR_OFF: Final = ("off", "no", "false", "0", "none", "")
_DSN_SCHEME: Final = re.compile(r"^postgres(ql)?(\+[a-z0-9_]+)?://", re.IGNORECASE)


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the setting and the value."""


def _parse_int(text: str) -> int:
    value = int(text.strip(), 10)
    return value


def positive_int(text: str) -> int:
    """Parse a whole number >= 1 (argparse ``type=``; raises ``ArgumentTypeError``)."""
    try:
        value = _parse_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """Parse a whole number >= 0 (argparse ``type=``; raises ``ArgumentTypeError``)."""
    try:
        value = _parse_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """Parse a number of seconds > 0 (argparse ``type=``; raises ``ArgumentTypeError``)."""
    try:
        value = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds, got {text!r}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def unmarked_policy(text: str) -> str:
    """Parse a ``poolaware_unmarked`` value (argparse ``type=``)."""
    value = text.strip().lower()
    if value not in UNMARKED_POLICIES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(UNMARKED_POLICIES)}, got {text!r}"
        )
    return value


def order_policy(text: str) -> str:
    """Parse a ``poolaware_order`` value (argparse ``type=``)."""
    value = text.strip().lower()
    if value not in ORDERS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(ORDERS)}, got {text!r}")
    return value


def share_mode(text: str) -> str:
    """Parse a ``poolaware_share`` value (argparse ``type=``)."""
    value = text.strip().lower()
    if value not in SHARE_MODES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(SHARE_MODES)}, got {text!r}")
    return value


def namespace(text: str) -> str:
    """Parse a ``poolaware_share_namespace`` value: printable, 1 to 63 characters."""
    value = text.strip()
    if not value or len(value) > MAX_NAMESPACE_LENGTH or not value.isprintable():
        raise argparse.ArgumentTypeError(
            f"expected 1 to {MAX_NAMESPACE_LENGTH} printable characters, got {text!r}"
        )
    return value


def boolean(text: str) -> bool:
    """Parse an ini-style boolean (argparse ``type=``)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def monitor_dsn(text: str) -> str:
    """Parse a ``poolaware_monitor`` value: a PostgreSQL DSN, or ``off`` (returned as "").

    Raises ``ArgumentTypeError`` naming the value with its password masked.
    """
    value = text.strip()
    if value.lower() in MONITOR_OFF:
        return ""
    if _DSN_SCHEME.match(value) or "=" in value:
        return value
    raise argparse.ArgumentTypeError(f"expected a PostgreSQL DSN or 'off', got {mask_dsn(value)!r}")


def text(value: str) -> str:
    """A value taken as it is (paths)."""
    return value


def parse_setting(name: str, text: str, parse: Callable[[str], T], *, secret: bool = False) -> T:
    """Apply a ``type=`` parser to a value that came from the ini or the environment; the
    error names the key or variable, and the value unless it may hold a password (the
    parser's own message shows it masked)."""
    try:
        return parse(text)
    except argparse.ArgumentTypeError as exc:
        shown = name if secret else f"{name}={text!r}"
        raise ConfigError(f"{shown}: {exc}") from None
