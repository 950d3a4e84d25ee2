"""Configuration in one place: command-line options, ini keys, environment variables."""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

if TYPE_CHECKING:
    import pytest

T = TypeVar("T")

# Environment variables these teams already use to size their pools.
ENV_POOL_SIZE: Final = "PG_POOL_SIZE"
ENV_MAX_OVERFLOW: Final = "PG_MAX_OVERFLOW"
ENV_POOL_TIMEOUT: Final = "PG_POOL_TIMEOUT"
DEFAULT_POOL_SIZE: Final = 10
DEFAULT_MAX_OVERFLOW: Final = 20
DEFAULT_POOL_TIMEOUT: Final = 30.0

#: DSN of the server the run uses, when the user has one (tests, demo, monitoring).
ENV_DSN: Final = "POOLAWARE_DSN"

DIST_MODE: Final = "poolaware"
SERIAL_MARKER: Final = "serial_only"
PARALLEL_MARKER: Final = "parallel_safe"

#: Where tests without either marker go before their connection needs are known.
UNMARKED_POLICIES: Final = ("parallel", "serial")
DEFAULT_UNMARKED_POLICY: Final = "parallel"
#: Connections a test is assumed to need before it has been measured.
DEFAULT_UNKNOWN_NEED: Final = 1

INI_BUDGET: Final = "poolaware_budget"
INI_UNMARKED: Final = "poolaware_unmarked"
INI_UNKNOWN_NEED: Final = "poolaware_unknown_need"
INI_RETRY: Final = "poolaware_retry_on_limit"
INI_GATE_TIMEOUT: Final = "poolaware_gate_timeout"
INI_RISKY_NEED: Final = "poolaware_risky_need"
INI_IDLE_NEED: Final = "poolaware_idle_need"
INI_MONITOR: Final = "poolaware_monitor"
INI_FAST_EXIT: Final = "poolaware_fast_exit"
INI_FANOUT_NICE: Final = "poolaware_fanout_nice"
INI_SHARE: Final = "poolaware_share"
INI_SHARE_NAMESPACE: Final = "poolaware_share_namespace"

#: ``poolaware_share``: runs against one server share its room through it (``auto``: when
#: the plugin has its own connection to the server), or each takes what it finds (``off``,
#: the default while sharing can still stall under heavy CPU load).
SHARE_MODES: Final = ("auto", "off")
DEFAULT_SHARE: Final = "off"
#: Runs share the room with the runs of the same name space only.
DEFAULT_SHARE_NAMESPACE: Final = "default"
#: Longest name space accepted (it is hashed into the advisory-lock keys).
MAX_NAMESPACE_LENGTH: Final = 63

#: CPU niceness every worker but the serial lane's adds to its own: enough for the
#: critical path to get about three times the CPU of a fan-out worker when they compete.
DEFAULT_FANOUT_NICE: Final = 5

#: Marker advice: an unmarked test holding at least this share of the budget at once is
#: a ``serial_only`` candidate (rounded up), unless ``poolaware_risky_need`` says otherwise.
RISKY_SHARE: Final = 0.5
#: Marker advice: a ``serial_only`` test holding at most this many connections at once is
#: a ``parallel_safe`` candidate.
DEFAULT_IDLE_NEED: Final = 0
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
    from pytest_poolaware.pgserver import mask_dsn

    raise argparse.ArgumentTypeError(f"expected a PostgreSQL DSN or 'off', got {mask_dsn(value)!r}")


def default_risky_need(budget: int) -> int:
    """Connections at once from which an unmarked test is advised ``serial_only``."""
    return max(1, math.ceil(budget * RISKY_SHARE))


def parse_setting(name: str, text: str, parse: Callable[[str], T]) -> T:
    """Apply a ``type=`` parser to a value that came from the ini or the environment."""
    try:
        return parse(text)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{name}={text!r}: {exc}") from None


@dataclass(frozen=True)
class PoolSettings:
    """Pool sizing shared by the engine helper and the default budget."""

    pool_size: int = DEFAULT_POOL_SIZE
    max_overflow: int = DEFAULT_MAX_OVERFLOW
    pool_timeout: float = DEFAULT_POOL_TIMEOUT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PoolSettings:
        """Read ``PG_POOL_SIZE``, ``PG_MAX_OVERFLOW`` and ``PG_POOL_TIMEOUT``; raise ConfigError."""
        env = os.environ if environ is None else environ

        def read(name: str, parse: Callable[[str], T], default: T) -> T:
            raw = env.get(name)
            return default if raw is None or raw.strip() == "" else parse_setting(name, raw, parse)

        return cls(
            pool_size=read(ENV_POOL_SIZE, positive_int, DEFAULT_POOL_SIZE),
            max_overflow=read(ENV_MAX_OVERFLOW, non_negative_int, DEFAULT_MAX_OVERFLOW),
            pool_timeout=read(ENV_POOL_TIMEOUT, positive_seconds, DEFAULT_POOL_TIMEOUT),
        )

    @property
    def max_connections(self) -> int:
        """The most connections one such pool can open."""
        return self.pool_size + self.max_overflow


@dataclass(frozen=True)
class Settings:
    """Everything the scheduler needs to know, validated; built once per run on the controller."""

    budget: int
    budget_source: str
    #: Whether the user set the budget (option, ini key, or the pool variables); if not,
    #: the room the server allows is the budget (``server_room``).
    budget_configured: bool = True
    unmarked: str = DEFAULT_UNMARKED_POLICY
    unknown_need: int = DEFAULT_UNKNOWN_NEED
    retry_on_limit: bool = True
    #: Skip the interpreter's last garbage collections when the run's processes exit.
    fast_exit: bool = True
    #: Niceness the fan-out workers add to their own (0: all workers alike).
    fanout_nice: int = DEFAULT_FANOUT_NICE
    gate_timeout: float = DEFAULT_POOL_TIMEOUT
    #: Marker advice thresholds (connections checked out at once); 0: half the budget.
    risky_need: int = 0
    idle_need: int = DEFAULT_IDLE_NEED
    #: Server-side monitoring: the DSN to sample ``pg_stat_activity`` with ("" when off),
    #: and where it came from.
    monitor_dsn: str = ""
    monitor_source: str = ""
    #: Sharing the server's room with other runs (``auto`` or ``off``), and with whom.
    share: str = DEFAULT_SHARE
    share_namespace: str = DEFAULT_SHARE_NAMESPACE
    #: Files to write at the end of the run (absolute paths), if asked for.
    report_path: str | None = None
    timeline_path: str | None = None
    advice_path: str | None = None

    @property
    def configured_budget(self) -> tuple[int, str] | None:
        """(budget, where it came from) when the user set one."""
        return (self.budget, self.budget_source) if self.budget_configured else None

    @property
    def serial_advice_need(self) -> int:
        """Connections at once from which an unmarked test is advised ``serial_only``."""
        return self.risky_need or default_risky_need(self.budget)

    @classmethod
    def from_config(cls, config: pytest.Config) -> Settings:
        """Resolve options over ini keys over environment; raise ConfigError on bad values."""
        pools = PoolSettings.from_env()

        def pick(option: str, ini: str, parse: Callable[[str], T]) -> tuple[T, str] | None:
            value: T | None = config.getoption(option)
            if value is not None:
                return value, f"--{option.replace('_', '-')}"
            raw = config.getini(ini)
            if isinstance(raw, str) and raw.strip():
                return parse_setting(ini, raw, parse), f"ini {ini}"
            return None

        budget = pick("pool_budget", INI_BUDGET, positive_int)
        configured = budget is not None or any(
            os.environ.get(name, "").strip() for name in (ENV_POOL_SIZE, ENV_MAX_OVERFLOW)
        )
        if budget is None:
            budget = (
                pools.max_connections,
                f"{ENV_POOL_SIZE} + {ENV_MAX_OVERFLOW} = {pools.pool_size} + {pools.max_overflow}",
            )
        unmarked = pick("poolaware_unmarked", INI_UNMARKED, unmarked_policy)
        unknown = pick("poolaware_unknown_need", INI_UNKNOWN_NEED, non_negative_int)
        retry = pick("poolaware_retry_on_limit", INI_RETRY, boolean)
        fast_exit = pick("poolaware_fast_exit", INI_FAST_EXIT, boolean)
        fanout_nice = pick("poolaware_fanout_nice", INI_FANOUT_NICE, non_negative_int)
        gate = pick("poolaware_gate_timeout", INI_GATE_TIMEOUT, positive_seconds)
        risky = pick("poolaware_risky_need", INI_RISKY_NEED, positive_int)
        idle = pick("poolaware_idle_need", INI_IDLE_NEED, non_negative_int)
        monitor, monitor_source = _monitor(config)
        share = pick("poolaware_share", INI_SHARE, share_mode)
        share_namespace = pick("poolaware_share_namespace", INI_SHARE_NAMESPACE, namespace)

        def path(option: str) -> str | None:
            value: str | None = config.getoption(option)
            if not value:
                return None
            return str(config.invocation_params.dir / os.path.expanduser(value))

        return cls(
            budget=budget[0],
            budget_source=budget[1],
            budget_configured=configured,
            unmarked=unmarked[0] if unmarked else DEFAULT_UNMARKED_POLICY,
            unknown_need=unknown[0] if unknown else DEFAULT_UNKNOWN_NEED,
            retry_on_limit=retry[0] if retry else True,
            fast_exit=fast_exit[0] if fast_exit else True,
            fanout_nice=fanout_nice[0] if fanout_nice else DEFAULT_FANOUT_NICE,
            gate_timeout=gate[0] if gate else pools.pool_timeout,
            risky_need=risky[0] if risky else 0,
            idle_need=idle[0] if idle else DEFAULT_IDLE_NEED,
            monitor_dsn=monitor,
            monitor_source=monitor_source,
            share=share[0] if share else DEFAULT_SHARE,
            share_namespace=share_namespace[0] if share_namespace else DEFAULT_SHARE_NAMESPACE,
            report_path=path("poolaware_report"),
            timeline_path=path("poolaware_timeline"),
            advice_path=path("poolaware_advice"),
        )


def _monitor(config: pytest.Config) -> tuple[str, str]:
    """The monitoring DSN and its source: option, ini, else ``POOLAWARE_DSN``; "" when off.

    Like ``parse_setting``, but an ini value is never echoed: it may hold a password.
    """
    value: str | None = config.getoption("poolaware_monitor")
    if value is not None:
        return value, "--poolaware-monitor"
    raw = config.getini(INI_MONITOR)
    if isinstance(raw, str) and raw.strip():
        try:
            return monitor_dsn(raw), f"ini {INI_MONITOR}"
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{INI_MONITOR}: {exc}") from None
    env = os.environ.get(ENV_DSN, "").strip()
    return (env, f"${ENV_DSN}") if env else ("", "")


def add_options(parser: pytest.Parser) -> None:
    """Register the plugin's options and ini keys (called from ``pytest_addoption``)."""
    group = parser.getgroup("poolaware", "connection-budget scheduling (--dist poolaware)")
    group.addoption(
        "--pool-budget",
        dest="pool_budget",
        type=positive_int,
        default=None,
        metavar="N",
        help="Most PostgreSQL connections the whole run may hold open at once "
        f"(default: ini {INI_BUDGET}, else ${ENV_POOL_SIZE} + ${ENV_MAX_OVERFLOW}).",
    )
    group.addoption(
        "--poolaware-unmarked",
        dest="poolaware_unmarked",
        type=unmarked_policy,
        default=None,
        metavar="POLICY",
        help="Where tests with neither marker go until their needs are measured: "
        f"{' or '.join(UNMARKED_POLICIES)} (default: {DEFAULT_UNMARKED_POLICY}).",
    )
    group.addoption(
        "--poolaware-unknown-need",
        dest="poolaware_unknown_need",
        type=non_negative_int,
        default=None,
        metavar="N",
        help=f"Connections assumed for a test not measured yet (default: {DEFAULT_UNKNOWN_NEED}).",
    )
    group.addoption(
        "--poolaware-retry-on-limit",
        dest="poolaware_retry_on_limit",
        type=boolean,
        default=None,
        metavar="BOOL",
        help="Run a test again, alone, when it failed on a connection limit (default: true).",
    )
    group.addoption(
        "--poolaware-fast-exit",
        dest="poolaware_fast_exit",
        type=boolean,
        default=None,
        metavar="BOOL",
        help="Let the controller and the workers exit without the interpreter's final "
        "garbage collections (default: true).",
    )
    group.addoption(
        "--poolaware-fanout-nice",
        dest="poolaware_fanout_nice",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="CPU niceness added by every local worker but the first (gw0), which starts "
        "the serial lane, so the run's critical path gets the CPU first; 0: off "
        f"(default: {DEFAULT_FANOUT_NICE}).",
    )
    group.addoption(
        "--poolaware-gate-timeout",
        dest="poolaware_gate_timeout",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help="How long a worker waits for budget before opening a connection anyway "
        f"(default: ${ENV_POOL_TIMEOUT}, else {DEFAULT_POOL_TIMEOUT:g}).",
    )
    group.addoption(
        "--poolaware-risky-need",
        dest="poolaware_risky_need",
        type=positive_int,
        default=None,
        metavar="N",
        help="Marker advice: unmarked tests that held at least N connections at once are "
        f"serial_only candidates (default: ini {INI_RISKY_NEED}, else half the budget).",
    )
    group.addoption(
        "--poolaware-idle-need",
        dest="poolaware_idle_need",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="Marker advice: serial_only tests that held at most N connections at once are "
        f"parallel_safe candidates (default: {DEFAULT_IDLE_NEED}).",
    )
    group.addoption(
        "--poolaware-advice",
        dest="poolaware_advice",
        default=None,
        metavar="PATH",
        help="Write the marker advice to PATH, one 'file:line: @pytest.mark.X' line per test.",
    )
    group.addoption(
        "--poolaware-report",
        dest="poolaware_report",
        default=None,
        metavar="PATH",
        help="Write the run's report (per test and per run) to PATH as JSON.",
    )
    group.addoption(
        "--poolaware-timeline",
        dest="poolaware_timeline",
        default=None,
        metavar="PATH",
        help="Write an SVG picture of open connections over time per worker to PATH.",
    )
    group.addoption(
        "--poolaware-monitor",
        dest="poolaware_monitor",
        type=monitor_dsn,
        default=None,
        metavar="DSN|off",
        help="Sample pg_stat_activity through DSN during the run and report the server's "
        f"peak (default: ini {INI_MONITOR}, else ${ENV_DSN} when set).",
    )
    group.addoption(
        "--poolaware-share",
        dest="poolaware_share",
        type=share_mode,
        default=None,
        metavar="auto|off",
        help="Share the server's room with other poolaware runs against it, through "
        f"the server; auto: when the plugin has its own connection (default: {DEFAULT_SHARE}).",
    )
    group.addoption(
        "--poolaware-share-namespace",
        dest="poolaware_share_namespace",
        type=namespace,
        default=None,
        metavar="NAME",
        help="Share only with runs of this name space "
        f"(default: ini {INI_SHARE_NAMESPACE}, else {DEFAULT_SHARE_NAMESPACE!r}).",
    )
    parser.addini(INI_BUDGET, "Connection budget for --dist poolaware (positive integer).")
    parser.addini(INI_UNMARKED, f"Placement of unmarked tests: {', '.join(UNMARKED_POLICIES)}.")
    parser.addini(INI_UNKNOWN_NEED, "Connections assumed for a test not measured yet.")
    parser.addini(INI_RETRY, "Rerun a test alone when it failed on a connection limit.")
    parser.addini(INI_FAST_EXIT, "Exit without the interpreter's final garbage collections.")
    parser.addini(INI_FANOUT_NICE, "CPU niceness added by every worker but the serial lane's.")
    parser.addini(INI_GATE_TIMEOUT, "Seconds a worker waits for budget before connecting anyway.")
    parser.addini(INI_RISKY_NEED, "Marker advice: connections at once making a test serial_only.")
    parser.addini(INI_IDLE_NEED, "Marker advice: connections at most for parallel_safe advice.")
    parser.addini(INI_MONITOR, "DSN to sample pg_stat_activity with during the run, or off.")
    parser.addini(INI_SHARE, "Share the server's room with other runs against it: auto or off.")
    parser.addini(INI_SHARE_NAMESPACE, "Name space of the runs that share the server's room.")
