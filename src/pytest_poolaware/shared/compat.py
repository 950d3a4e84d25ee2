"""Every private or undocumented pytest / pytest-xdist interface the plugin relies on.

xdist has no public API for a third-party scheduler beyond the ``pytest_xdist_make_scheduler``
hook and the ``Scheduling`` protocol its own schedulers follow, and the worker reruns an
item with pytest's own run protocol. Those uses live here, each listed in ``INTERNALS``
with the versions it was checked against (``TESTED``: the ends of the compatibility
matrix, ``tox -e oldest`` and ``tox -e newest``), so that a new release of either is
checked in one place. Imports of the internals happen on first use: an installed but
unselected plugin never touches them, and a version too old for them is refused by
``check_versions`` (a usage error) before anything here runs.

The PostgreSQL drivers' internals are listed by each driver's module (``worker/drivers``);
the versions they were checked against are here too (``DRIVERS_TESTED``), beside the
matrix's other ends.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from packaging.version import InvalidVersion, Version

if TYPE_CHECKING:
    import pytest

#: Distributions whose internals are used, and the (oldest, newest) versions checked: the
#: pins of ``constraints/oldest.txt`` and ``constraints/newest.txt``.
TESTED: Final[Mapping[str, tuple[str, str]]] = {
    "pytest": ("8.0.0", "9.2.0"),
    "pytest-xdist": ("3.6.1", "3.8.0"),
}

#: The PostgreSQL drivers whose private internals the worker's hooks rely on (each
#: driver's ``Driver.internals``, ``worker/drivers``), and the (oldest, newest) versions
#: checked: the pins of the matrix's ends too. Unlike pytest's and xdist's, a driver
#: outside the range is not refused: a hook that no longer fits leaves that driver
#: uncounted, with a note in the summary. (psycopg2 is checked as psycopg2-binary, the
#: same code.)
DRIVERS_TESTED: Final[Mapping[str, tuple[str, str]]] = {
    "psycopg": ("3.1.0", "3.3.9"),
    "psycopg-pool": ("3.1.9", "3.3.3"),
    "psycopg2-binary": ("2.9.9", "2.9.13"),
    "asyncpg": ("0.29.0", "0.32.0"),
    "pg8000": ("1.30.1", "1.31.6"),
}


@dataclass(frozen=True)
class Internal:
    """One private or undocumented interface: whose, what, where we use it, and why."""

    package: str
    what: str
    used_in: str
    why: str


INTERNALS: Final[tuple[Internal, ...]] = (
    Internal(
        "pytest",
        "_pytest.runner.runtestprotocol(item, nextitem=..., log=False)",
        "worker/agent.py (run_test_protocol)",
        "run an item's setup, call and teardown without reporting them, so a test refused "
        "a connection can be rerun alone and its measures ride on its last report",
    ),
    Internal(
        "pytest",
        "Parser.getgroup(name).options, Argument.names(), Argument.attrs()['choices']",
        "plugin.py (add_dist_choice)",
        "add 'poolaware' to the choices of xdist's --dist before the command line is parsed",
    ),
    Internal(
        "pytest",
        "extra JSON-able attributes of a TestReport survive pytest_report_to_serializable",
        "worker/agent.py, plugin.py (report.poolaware)",
        "an item's measures travel from the worker with its last report",
    ),
    Internal(
        "pytest-xdist",
        "the --dist option's argparse choices list (xdist.plugin)",
        "plugin.py (add_dist_choice)",
        "xdist fixes the choices (pytest-xdist issue #970)",
    ),
    Internal(
        "pytest-xdist",
        "WorkerController.notify_inproc('unscheduled', node=..., indices=[]), which "
        "DSession hands to Scheduling.remove_pending_tests_from_node",
        "plugin.py (wake_controller)",
        "the controller loop has no timer: side-channel news must wake the scheduler",
    ),
    Internal(
        "pytest-xdist",
        "TestReport.node and TestReport.item_index on the controller",
        "plugin.py (report_origin)",
        "which worker sent a report, and for which item of its collection",
    ),
    Internal(
        "pytest-xdist",
        "WorkerController.shutting_down and WorkerController.workeroutput",
        "scheduler.py (is_shutting_down, finished_normally)",
        "tell a run being stopped (-x, Ctrl-C) and a worker that ended its session from a crash",
    ),
    Internal(
        "pytest-xdist",
        "xdist.workermanage.parse_tx_spec_config(config) (parse_spec_config up to 3.6)",
        "scheduler.py (worker_count)",
        "how many workers -n/--tx asks for, as xdist counts them",
    ),
    Internal(
        "pytest-xdist",
        "xdist.report.report_collection_diff(...)",
        "scheduler.py (collection_diff)",
        "a worker that collected other tests is reported in xdist's own words",
    ),
    Internal(
        "pytest-xdist",
        "the Scheduling protocol's call order (xdist.scheduler.protocol, DSession): "
        "add_node_collection before schedule, schedule again for later collections, "
        "remove_node returning the crashed item, has_pending gating the 'N workers' line",
        "scheduler.py (PoolAwareScheduling)",
        "followed as xdist's own schedulers follow it; not documented for third parties",
    ),
)


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (None if it is not installed)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def check_versions(versions: Callable[[str], str | None] = installed_version) -> list[str]:
    """Refuse versions older than tested; return one warning line per newer one.

    Raises ``pytest.UsageError`` naming each package, its version and the oldest tested.
    A pre-release of the oldest tested version (``3.6.0rc1``) counts as older. Newer means
    a newer minor or major release (bug-fix releases keep their internals); an unparsable
    version is let through with a warning.
    """
    import pytest

    too_old, warnings = [], []
    for package, (oldest, newest) in TESTED.items():
        found = versions(package)
        if found is None:
            continue
        version = _release(found)
        if version is None:
            warnings.append(
                f"pytest-poolaware: cannot read {package}'s version {found!r}; "
                f"tested with {oldest} to {newest}"
            )
        elif version < Version(oldest):
            too_old.append(f"{package} {found} (needs >= {oldest})")
        elif version.release[:2] > Version(newest).release[:2]:
            warnings.append(
                f"pytest-poolaware: WARNING: {package} {found} is newer than tested "
                f"(up to {newest}); --dist poolaware relies on its internals, report any problem"
            )
    if too_old:
        raise pytest.UsageError(
            "--dist poolaware: too old for pytest-poolaware: "
            + ", ".join(too_old)
            + "; upgrade: pip install -U pytest pytest-xdist"
        )
    return warnings


# -- pytest ----------------------------------------------------------------------------------


def run_test_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> list[pytest.TestReport]:
    """An item's setup, call and teardown, unreported (the caller reports them)."""
    from _pytest.runner import runtestprotocol

    return runtestprotocol(item, nextitem=nextitem, log=False)


def add_dist_choice(parser: pytest.Parser, mode: str, help_text: str) -> None:
    """Add ``mode`` to xdist's ``--dist`` choices (and its help), once xdist added the option.

    Any other shape of the option is left alone: argparse then refuses ``--dist mode``
    with its own usage error.
    """
    for option in parser.getgroup("xdist").options:
        if "--dist" not in option.names():
            continue
        attrs = option.attrs()
        choices = attrs.get("choices")
        if isinstance(choices, list) and mode not in choices:
            choices.append(mode)
            attrs["help"] = (attrs.get("help") or "") + "\n\n" + help_text


# -- pytest-xdist ----------------------------------------------------------------------------


def wake_controller(node: Any) -> None:
    """Make xdist's controller loop call the scheduler now (from any thread).

    ``unscheduled`` is xdist's own event; with no indices it reaches
    ``Scheduling.remove_pending_tests_from_node``, which reads the side channel.
    """
    node.notify_inproc("unscheduled", node=node, indices=[])


def report_origin(report: pytest.TestReport) -> tuple[Any, int] | None:
    """(worker node, item index) of a report a worker sent; None for the controller's own."""
    node = getattr(report, "node", None)
    index = getattr(report, "item_index", None)
    if node is None or not isinstance(index, int):
        return None
    return node, index


def is_shutting_down(node: Any) -> bool:
    """Whether xdist told this worker to stop (``-x``, ``--maxfail``, Ctrl-C, the end)."""
    return bool(node.shutting_down)


def finished_normally(node: Any) -> bool:
    """Whether a worker that went away had ended its session (rather than crashed)."""
    return hasattr(node, "workeroutput")


def worker_count(config: pytest.Config) -> int:
    """Workers the run asked for (``-n``/``--tx``), as xdist counts them."""
    from xdist import workermanage

    parse = getattr(workermanage, "parse_tx_spec_config", None)
    if parse is None:  # its name up to 3.6
        parse = workermanage.parse_spec_config
    return len(parse(config))


def collection_diff(base: list[str], other: list[str], base_id: str, other_id: str) -> str:
    """xdist's message for two workers that collected different tests."""
    from xdist.report import report_collection_diff

    message: str = report_collection_diff(base, other, base_id, other_id)
    return message
