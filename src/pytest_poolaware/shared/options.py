"""The table of options: each setting's command-line flag, ini key and environment
variable, declared once with its parser (``parsers``), default and help."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from pytest_poolaware.shared.parsers import (
    ORDERS,
    UNMARKED_POLICIES,
    boolean,
    monitor_dsn,
    namespace,
    non_negative_int,
    order_policy,
    parse_setting,
    positive_int,
    positive_seconds,
    share_mode,
    text,
    unmarked_policy,
)

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

#: The default of each vocabulary of ``parsers``: ``UNMARKED_POLICIES``, ``ORDERS``.
DEFAULT_UNMARKED_POLICY: Final = "parallel"
#: Connections a test is assumed to need before it has been measured.
DEFAULT_UNKNOWN_NEED: Final = 1
DEFAULT_ORDER: Final = "collection"

INI_BUDGET: Final = "poolaware_budget"
INI_UNMARKED: Final = "poolaware_unmarked"
INI_UNKNOWN_NEED: Final = "poolaware_unknown_need"
INI_RETRY: Final = "poolaware_retry_on_limit"
INI_GATE_TIMEOUT: Final = "poolaware_gate_timeout"
INI_GO_TIMEOUT: Final = "poolaware_go_timeout"
INI_RISKY_NEED: Final = "poolaware_risky_need"
INI_IDLE_NEED: Final = "poolaware_idle_need"
INI_MONITOR: Final = "poolaware_monitor"
INI_FAST_EXIT: Final = "poolaware_fast_exit"
INI_FANOUT_NICE: Final = "poolaware_fanout_nice"
INI_ORDER: Final = "poolaware_order"
INI_SHARE: Final = "poolaware_share"
INI_SHARE_NAMESPACE: Final = "poolaware_share_namespace"
INI_HISTORY: Final = "poolaware_history"

DEFAULT_SHARE: Final = "auto"
#: Runs share the room with the runs of the same name space only.
DEFAULT_SHARE_NAMESPACE: Final = "default"

#: CPU niceness every worker but the serial lane's adds to its own: enough for the
#: critical path to get about three times the CPU of a fan-out worker when they compete.
DEFAULT_FANOUT_NICE: Final = 5

#: Marker advice: a ``serial_only`` test holding at most this many connections at once is
#: a ``parallel_safe`` candidate.
DEFAULT_IDLE_NEED: Final = 0

#: A worker's wait for its go to start a test is bounded by this many gate timeouts
#: unless set: a go waits for whole tests to end (the connect gate for connections
#: within one), so it may take much longer, but never for ever.
GO_TIMEOUT_GATES: Final = 10


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
    #: A flag that takes no value (``store_true``): given, it is True.
    switch: bool = False

    @property
    def dest(self) -> str:
        """The attribute of ``config.option``: the flag's name with underscores."""
        return self.flag.lstrip("-").replace("-", "_")

    def register(self, group: pytest.OptionGroup, parser: pytest.Parser) -> None:
        kwargs: dict[str, Any] = {"metavar": self.metavar}
        if self.switch:
            kwargs = {"action": "store_true"}
        elif self.parse is not text:
            kwargs["type"] = self.parse
        group.addoption(self.flag, dest=self.dest, default=None, help=self.help, **kwargs)
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
GO_TIMEOUT: Final = Option(
    "--poolaware-go-timeout",
    "SECONDS",
    "How long a worker waits for the controller's go to start a test before the test "
    "fails without running (the summary counts them) "
    f"(default: {GO_TIMEOUT_GATES} gate timeouts).",
    positive_seconds,
    INI_GO_TIMEOUT,
    "Seconds a worker waits for its go before the test fails without running.",
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
HISTORY_PATH: Final = Option[str](
    "--poolaware-history",
    "PATH",
    "Read learned needs and durations from PATH, a JSON file a team commits or caches; "
    "its entries come first, pytest's cache fills in the tests it lacks "
    f"(default: ini {INI_HISTORY}, relative to the ini file).",
    ini=INI_HISTORY,
    ini_help="JSON file of learned needs and durations, read before pytest's cache.",
)
STORE_HISTORY: Final = Option(
    "--poolaware-store-history",
    "",
    "Write the learned needs and durations, with what this run measured, back to the "
    "--poolaware-history file (sorted, one test a line).",
    boolean,
    switch=True,
    default=False,
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
    GO_TIMEOUT,
    RISKY_NEED,
    IDLE_NEED,
    ADVICE_PATH,
    REPORT_PATH,
    TIMELINE_PATH,
    TRACE_PATH,
    HISTORY_PATH,
    STORE_HISTORY,
    MONITOR,
    SHARE,
    SHARE_NAMESPACE,
)


def add_options(parser: pytest.Parser) -> None:
    """Register the plugin's options and ini keys (called from ``pytest_addoption``)."""
    group = parser.getgroup("poolaware", "connection-budget scheduling (--dist poolaware)")
    for option in OPTIONS:
        option.register(group, parser)
