"""Configuration in one place: the run's settings, resolved from command-line options over
ini keys over environment variables (the table of them is ``options``, what each accepts
``parsers``). The names other modules import from here stay importable from here."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from pytest_poolaware.shared.options import (
    ADVICE_PATH,
    BUDGET,
    DEFAULT_FANOUT_NICE,
    DEFAULT_IDLE_NEED,
    DEFAULT_MAX_OVERFLOW,
    DEFAULT_ORDER,
    DEFAULT_POOL_SIZE,
    DEFAULT_POOL_TIMEOUT,
    DEFAULT_SHARE,
    DEFAULT_SHARE_NAMESPACE,
    DEFAULT_UNKNOWN_NEED,
    DEFAULT_UNMARKED_POLICY,
    ENV_DSN,
    ENV_MAX_OVERFLOW,
    ENV_POOL_SIZE,
    ENV_POOL_TIMEOUT,
    FANOUT_NICE,
    FAST_EXIT,
    GATE_TIMEOUT,
    GO_TIMEOUT,
    GO_TIMEOUT_GATES,
    HISTORY_PATH,
    IDLE_NEED,
    MONITOR,
    OPTIONS,
    ORDER,
    REPORT_PATH,
    RETRY_ON_LIMIT,
    RISKY_NEED,
    SHARE,
    SHARE_NAMESPACE,
    STORE_HISTORY,
    TIMELINE_PATH,
    TRACE_PATH,
    UNKNOWN_NEED,
    UNMARKED,
    Option,
    add_options,
)
from pytest_poolaware.shared.parsers import (
    ConfigError,
    monitor_dsn,
    non_negative_int,
    parse_setting,
    positive_int,
    positive_seconds,
)

if TYPE_CHECKING:
    import pytest

__all__ = [
    "BUDGET",
    "DEFAULT_UNMARKED_POLICY",
    "DIST_MODE",
    "ENV_DSN",
    "GATE_TIMEOUT",
    "OPTIONS",
    "ConfigError",
    "PoolSettings",
    "Settings",
    "add_options",
    "default_risky_need",
    "monitor_dsn",
]

T = TypeVar("T")

DIST_MODE: Final = "poolaware"

#: Marker advice: an unmarked test holding at least this share of the budget at once is
#: a ``serial_only`` candidate (rounded up), unless ``poolaware_risky_need`` says otherwise.
RISKY_SHARE: Final = 0.5
#: Marker advice: never from fewer connections at once than this. A test holding one
#: connection is no risk to a parallel run, whatever the budget.
MIN_RISKY_NEED: Final = 2


def default_risky_need(budget: int) -> int:
    """Connections at once from which an unmarked test is advised ``serial_only``."""
    return max(MIN_RISKY_NEED, math.ceil(budget * RISKY_SHARE))


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
    #: ``collection`` or ``duration`` (``ORDERS``).
    order: str = DEFAULT_ORDER
    retry_on_limit: bool = True
    #: Skip the interpreter's last garbage collections when the run's processes exit.
    fast_exit: bool = True
    #: Niceness the fan-out workers add to their own (0: all workers alike).
    fanout_nice: int = DEFAULT_FANOUT_NICE
    gate_timeout: float = DEFAULT_POOL_TIMEOUT
    #: The longest a worker waits for its go (0: ``GO_TIMEOUT_GATES`` gate timeouts).
    go_wait: float = 0.0
    #: Marker advice thresholds (connections checked out at once); 0: half the budget.
    risky_need: int = 0
    idle_need: int = DEFAULT_IDLE_NEED
    #: Server-side monitoring: the DSN to sample ``pg_stat_activity`` with ("" when off),
    #: and where it came from.
    monitor_dsn: str = ""
    monitor_source: str = ""
    #: ``$POOLAWARE_DSN`` when the plugin's connection was given elsewhere
    #: (``poolaware_monitor`` as another login): the tests' login, whose room is read too.
    tests_dsn: str = ""
    #: Sharing the server's room with other runs (``auto`` or ``off``), and with whom.
    share: str = DEFAULT_SHARE
    share_namespace: str = DEFAULT_SHARE_NAMESPACE
    #: Files to write at the end of the run (absolute paths), if asked for.
    report_path: str | None = None
    timeline_path: str | None = None
    trace_path: str | None = None
    advice_path: str | None = None
    #: The learned data's file (``--poolaware-history``), read before pytest's cache,
    #: and whether the run writes it back (``--poolaware-store-history``).
    history_path: str | None = None
    store_history: bool = False
    #: The run's xdist workers (``-n``), 0 when not known (``--tx``, no xdist).
    workers: int = 0

    @property
    def go_timeout(self) -> float:
        """How long a worker waits for its go before its test fails without running."""
        return self.go_wait or GO_TIMEOUT_GATES * self.gate_timeout

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
        history = history_path(config)
        store = bool(STORE_HISTORY.value(config))
        if store:
            check_storable(history, HISTORY_PATH.resolve(config))

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
            go_wait=GO_TIMEOUT.value(config) or 0.0,
            risky_need=RISKY_NEED.value(config) or 0,
            idle_need=_given(IDLE_NEED.value(config)),
            monitor_dsn=monitor,
            monitor_source=monitor_source,
            tests_dsn=_tests_dsn(monitor, monitor_source),
            share=_given(SHARE.value(config)),
            share_namespace=_given(SHARE_NAMESPACE.value(config)),
            report_path=path(REPORT_PATH),
            timeline_path=path(TIMELINE_PATH),
            trace_path=path(TRACE_PATH),
            advice_path=path(ADVICE_PATH),
            history_path=history,
            store_history=store,
            workers=_workers(config),
        )


def _workers(config: pytest.Config) -> int:
    """``-n`` as xdist resolved it (``auto`` is a number by the time plugins configure),
    within ``--maxprocesses``; 0 when there is none, or when it is not a number yet."""
    value = getattr(config.option, "numprocesses", None)
    most = getattr(config.option, "maxprocesses", None)
    if not isinstance(value, int):
        return 0
    return min(value, most) if isinstance(most, int) and most > 0 else value


def history_path(config: pytest.Config) -> str | None:
    """The learned data's file, absolute: an option's path is relative to where pytest
    was run, an ini key's to the ini file (as pytest's own ``paths`` keys)."""
    resolved = HISTORY_PATH.resolve(config)
    if resolved is None:
        return None
    value, source = resolved
    if source == HISTORY_PATH.flag:
        base = Path(config.invocation_params.dir)
    else:
        base = config.inipath.parent if config.inipath is not None else config.rootpath
    return str(base / os.path.expanduser(value))


def check_storable(path: str | None, given: tuple[str, str] | None) -> None:
    """``--poolaware-store-history`` needs a file it can write: raise ConfigError naming
    the option and the value when it has none, rather than lose the run's data at its end."""
    if path is None or given is None:
        raise ConfigError(
            f"{STORE_HISTORY.flag} needs a file to write: give {HISTORY_PATH.flag}=PATH "
            f"(or ini {HISTORY_PATH.ini})"
        )
    value, source = given
    target = Path(path)
    if target.is_dir():
        problem = "it is a directory"
    elif not target.parent.is_dir():
        problem = f"its directory {str(target.parent)!r} does not exist"
    elif not os.access(target if target.exists() else target.parent, os.W_OK):
        problem = "it is not writable"
    else:
        return
    raise ConfigError(
        f"{STORE_HISTORY.flag} cannot write the learned data to {source} {value!r}: {problem}"
    )


def _tests_dsn(monitor: str, monitor_source: str) -> str:
    """``$POOLAWARE_DSN`` when the plugin's connection was given elsewhere, else ""."""
    tests_dsn = os.environ.get(ENV_DSN, "").strip()
    if not monitor or monitor_source == f"${ENV_DSN}" or not tests_dsn:
        return ""
    return parse_setting(f"${ENV_DSN}", tests_dsn, monitor_dsn, secret=True)


def _given(value: T | None) -> T:
    """A value whose option has a default, so it is never None."""
    assert value is not None
    return value
