"""Configuration in one place: command-line options, ini keys, environment variables."""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from pytest_poolaware.shared.dsn import mask_dsn

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

#: Where tests without either marker go before their connection needs are known.
UNMARKED_POLICIES: Final = ("parallel", "serial")
DEFAULT_UNMARKED_POLICY: Final = "parallel"
#: Connections a test is assumed to need before it has been measured.
DEFAULT_UNKNOWN_NEED: Final = 1
#: How each worker's tests are ordered: ``collection`` (as ``--dist load``: each worker in
#: collection order) or ``duration`` (longest module first, across the collection).
ORDERS: Final = ("collection", "duration")
DEFAULT_ORDER: Final = "collection"

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
INI_ORDER: Final = "poolaware_order"
INI_SHARE: Final = "poolaware_share"
INI_SHARE_NAMESPACE: Final = "poolaware_share_namespace"

#: ``poolaware_share``: runs against one server share its room through it (``auto``, the
#: default: whenever the plugin has its own connection to the server and no pooler stands
#: in between), or each takes what it finds (``off``).
SHARE_MODES: Final = ("auto", "off")
DEFAULT_SHARE: Final = "auto"
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
#: Marker advice: never from fewer connections at once than this. A test holding one
#: connection is no risk to a parallel run, whatever the budget.
MIN_RISKY_NEED: Final = 2
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


def default_risky_need(budget: int) -> int:
    """Connections at once from which an unmarked test is advised ``serial_only``."""
    return max(MIN_RISKY_NEED, math.ceil(budget * RISKY_SHARE))


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
class Option(Generic[T]):
    """One setting, declared once: its command-line flag, ini key and environment variable
    (resolved in that order), its parser, default and help.

    ``parse`` is a pure ``type=`` parser raising ``argparse.ArgumentTypeError``: pytest
    turns that into a usage error naming the flag and the value, and ``resolve`` into a
    ``ConfigError`` naming the ini key or variable and the value.
    """

    flag: str
    metavar: str
    help: str
    parse: Callable[[str], T] = text  # type: ignore[assignment]
    ini: str | None = None
    ini_help: str = ""
    env: str | None = None
    #: Used when none of the three is set (None: ``Settings.from_config`` works it out).
    default: T | None = None
    #: Parser of environment values, when not ``parse`` (``$POOLAWARE_DSN`` is shared with
    #: the suite under test, which may read it its own way: it is taken as it is).
    env_parse: Callable[[str], T] | None = None
    #: Values may hold a password: errors never echo them unmasked.
    secret: bool = False

    @property
    def dest(self) -> str:
        """The attribute of ``config.option``: the flag's name with underscores."""
        return self.flag.lstrip("-").replace("-", "_")

    def register(self, group: pytest.OptionGroup, parser: pytest.Parser) -> None:
        kwargs = {} if self.parse is text else {"type": self.parse}
        group.addoption(
            self.flag, dest=self.dest, default=None, metavar=self.metavar, help=self.help, **kwargs
        )
        if self.ini is not None:
            parser.addini(self.ini, self.ini_help)

    def resolve(
        self, config: pytest.Config, environ: Mapping[str, str] | None = None
    ) -> tuple[T, str] | None:
        """The value and where it came from, or None when none of the three is set."""
        value: T | None = config.getoption(self.dest)
        if value is not None:
            return value, self.flag
        if self.ini is not None:
            raw = config.getini(self.ini)
            if isinstance(raw, str) and raw.strip():
                return parse_setting(
                    self.ini, raw, self.parse, secret=self.secret
                ), f"ini {self.ini}"
        env = os.environ if environ is None else environ
        raw = env.get(self.env, "").strip() if self.env is not None else ""
        if not raw:
            return None
        parse = self.parse if self.env_parse is None else self.env_parse
        return parse_setting(str(self.env), raw, parse, secret=self.secret), f"${self.env}"

    def value(self, config: pytest.Config) -> T | None:
        """The resolved value, else the default."""
        resolved = self.resolve(config)
        return self.default if resolved is None else resolved[0]


BUDGET: Final = Option(
    "--pool-budget",
    "N",
    "Most PostgreSQL connections the whole run may hold open at once "
    f"(default: ini {INI_BUDGET}, else ${ENV_POOL_SIZE} + ${ENV_MAX_OVERFLOW}).",
    positive_int,
    INI_BUDGET,
    "Connection budget for --dist poolaware (positive integer).",
)
UNMARKED: Final = Option(
    "--poolaware-unmarked",
    "POLICY",
    "Where tests with neither marker go until their needs are measured: "
    f"{' or '.join(UNMARKED_POLICIES)} (default: {DEFAULT_UNMARKED_POLICY}).",
    unmarked_policy,
    INI_UNMARKED,
    f"Placement of unmarked tests: {', '.join(UNMARKED_POLICIES)}.",
    default=DEFAULT_UNMARKED_POLICY,
)
UNKNOWN_NEED: Final = Option(
    "--poolaware-unknown-need",
    "N",
    f"Connections assumed for a test not measured yet (default: {DEFAULT_UNKNOWN_NEED}).",
    non_negative_int,
    INI_UNKNOWN_NEED,
    "Connections assumed for a test not measured yet.",
    default=DEFAULT_UNKNOWN_NEED,
)
ORDER: Final = Option(
    "--poolaware-order",
    "ORDER",
    "collection: each worker runs its tests in collection order, as with "
    "--dist load; duration: longest modules first, which may run a test after one "
    f"that comes later in the collection (default: {DEFAULT_ORDER}).",
    order_policy,
    INI_ORDER,
    f"Order of each worker's tests: {', '.join(ORDERS)}.",
    default=DEFAULT_ORDER,
)
RETRY_ON_LIMIT: Final = Option(
    "--poolaware-retry-on-limit",
    "BOOL",
    "Run a test again, alone, when it failed on a connection limit (default: true).",
    boolean,
    INI_RETRY,
    "Rerun a test alone when it failed on a connection limit.",
    default=True,
)
FAST_EXIT: Final = Option(
    "--poolaware-fast-exit",
    "BOOL",
    "Let the controller and the workers exit without the interpreter's final "
    "garbage collections (default: true).",
    boolean,
    INI_FAST_EXIT,
    "Exit without the interpreter's final garbage collections.",
    default=True,
)
FANOUT_NICE: Final = Option(
    "--poolaware-fanout-nice",
    "N",
    "CPU niceness added by every local worker but the first (gw0), which starts "
    "the serial lane, so the run's critical path gets the CPU first; 0: off "
    f"(default: {DEFAULT_FANOUT_NICE}).",
    non_negative_int,
    INI_FANOUT_NICE,
    "CPU niceness added by every worker but the serial lane's.",
    default=DEFAULT_FANOUT_NICE,
)
GATE_TIMEOUT: Final = Option(
    "--poolaware-gate-timeout",
    "SECONDS",
    "How long a worker waits for budget before opening a connection anyway, or, "
    "when the budget is the server's own room, giving way (the test is rerun alone) "
    f"(default: ${ENV_POOL_TIMEOUT}, else {DEFAULT_POOL_TIMEOUT:g}).",
    positive_seconds,
    INI_GATE_TIMEOUT,
    "Seconds a worker waits for budget before connecting anyway (or giving way).",
    env=ENV_POOL_TIMEOUT,
    default=DEFAULT_POOL_TIMEOUT,
)
RISKY_NEED: Final = Option(
    "--poolaware-risky-need",
    "N",
    "Marker advice: unmarked tests that held at least N connections at once are "
    f"serial_only candidates (default: ini {INI_RISKY_NEED}, else half the budget).",
    positive_int,
    INI_RISKY_NEED,
    "Marker advice: connections at once making a test serial_only.",
)
IDLE_NEED: Final = Option(
    "--poolaware-idle-need",
    "N",
    "Marker advice: serial_only tests that held at most N connections at once are "
    f"parallel_safe candidates (default: {DEFAULT_IDLE_NEED}).",
    non_negative_int,
    INI_IDLE_NEED,
    "Marker advice: connections at most for parallel_safe advice.",
    default=DEFAULT_IDLE_NEED,
)
ADVICE_PATH: Final = Option[str](
    "--poolaware-advice",
    "PATH",
    "Write the marker advice to PATH, one 'file:line: @pytest.mark.X' line per test.",
)
REPORT_PATH: Final = Option[str](
    "--poolaware-report", "PATH", "Write the run's report (per test and per run) to PATH as JSON."
)
TIMELINE_PATH: Final = Option[str](
    "--poolaware-timeline",
    "PATH",
    "Write an SVG picture of open connections over time per worker to PATH.",
)
TRACE_PATH: Final = Option[str](
    "--poolaware-trace",
    "PATH",
    "Write the run to PATH in the Chrome trace event format (JSON), for Perfetto "
    "or chrome://tracing: a track per worker, each test a span, connections as counters.",
)
MONITOR: Final = Option[str](
    "--poolaware-monitor",
    "DSN|off",
    "Sample pg_stat_activity through DSN during the run and report the server's "
    f"peak (default: ini {INI_MONITOR}, else ${ENV_DSN} when set).",
    monitor_dsn,
    INI_MONITOR,
    "DSN to sample pg_stat_activity with during the run, or off.",
    env=ENV_DSN,
    env_parse=text,
    secret=True,
)
SHARE: Final = Option(
    "--poolaware-share",
    "auto|off",
    "Share the server's room with other poolaware runs against it, through the "
    "server; auto: whenever the plugin has its own connection and no pooler stands in "
    f"between; off: each run takes what it finds (default: {DEFAULT_SHARE}).",
    share_mode,
    INI_SHARE,
    "Share the server's room with other runs against it: auto or off.",
    default=DEFAULT_SHARE,
)
SHARE_NAMESPACE: Final = Option(
    "--poolaware-share-namespace",
    "NAME",
    "Share only with runs of this name space "
    f"(default: ini {INI_SHARE_NAMESPACE}, else {DEFAULT_SHARE_NAMESPACE!r}).",
    namespace,
    INI_SHARE_NAMESPACE,
    "Name space of the runs that share the server's room.",
    default=DEFAULT_SHARE_NAMESPACE,
)
#: Every option, in the order ``--help`` lists them (ini keys: ``pytest --help`` too).
OPTIONS: Final[tuple[Option[Any], ...]] = (
    BUDGET,
    UNMARKED,
    UNKNOWN_NEED,
    ORDER,
    RETRY_ON_LIMIT,
    FAST_EXIT,
    FANOUT_NICE,
    GATE_TIMEOUT,
    RISKY_NEED,
    IDLE_NEED,
    ADVICE_PATH,
    REPORT_PATH,
    TIMELINE_PATH,
    TRACE_PATH,
    MONITOR,
    SHARE,
    SHARE_NAMESPACE,
)


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
    #: ``collection`` or ``duration`` (``ORDERS``).
    order: str = DEFAULT_ORDER
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
    trace_path: str | None = None
    advice_path: str | None = None

    @property
    def serial_advice_need(self) -> int:
        """Connections at once from which an unmarked test is advised ``serial_only``."""
        return self.advice_need(self.budget)

    def advice_need(self, budget: int) -> int:
        """``serial_advice_need`` for the budget the run ended with (the server's room,
        say, rather than the configured one)."""
        return max(MIN_RISKY_NEED, self.risky_need or default_risky_need(budget))

    @classmethod
    def from_config(cls, config: pytest.Config) -> Settings:
        """Resolve options over ini keys over environment; raise ConfigError on bad values."""
        pools = PoolSettings.from_env()
        given = BUDGET.resolve(config)
        configured = given is not None or any(
            os.environ.get(name, "").strip() for name in (ENV_POOL_SIZE, ENV_MAX_OVERFLOW)
        )
        budget = given or (
            pools.max_connections,
            f"{ENV_POOL_SIZE} + {ENV_MAX_OVERFLOW} = {pools.pool_size} + {pools.max_overflow}",
        )
        monitor, monitor_source = MONITOR.resolve(config) or ("", "")

        def path(option: Option[str]) -> str | None:
            value = config.getoption(option.dest)
            if not value:
                return None
            return str(config.invocation_params.dir / os.path.expanduser(value))

        return cls(
            budget=budget[0],
            budget_source=budget[1],
            budget_configured=configured,
            unmarked=UNMARKED.value(config) or DEFAULT_UNMARKED_POLICY,
            unknown_need=_given(UNKNOWN_NEED.value(config)),
            order=_given(ORDER.value(config)),
            retry_on_limit=_given(RETRY_ON_LIMIT.value(config)),
            fast_exit=_given(FAST_EXIT.value(config)),
            fanout_nice=_given(FANOUT_NICE.value(config)),
            gate_timeout=_given(GATE_TIMEOUT.value(config)),
            risky_need=RISKY_NEED.value(config) or 0,
            idle_need=_given(IDLE_NEED.value(config)),
            monitor_dsn=monitor,
            monitor_source=monitor_source,
            share=_given(SHARE.value(config)),
            share_namespace=_given(SHARE_NAMESPACE.value(config)),
            report_path=path(REPORT_PATH),
            timeline_path=path(TIMELINE_PATH),
            trace_path=path(TRACE_PATH),
            advice_path=path(ADVICE_PATH),
        )


def _given(value: T | None) -> T:
    """A value whose option has a default, so it is never None."""
    assert value is not None
    return value


def add_options(parser: pytest.Parser) -> None:
    """Register the plugin's options and ini keys (called from ``pytest_addoption``)."""
    group = parser.getgroup("poolaware", "connection-budget scheduling (--dist poolaware)")
    for option in OPTIONS:
        option.register(group, parser)
