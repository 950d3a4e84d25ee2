"""Drivers as descriptors: each driver is one ``Driver`` record in one module of
``worker/drivers``, and nothing outside that package compares a driver's name.

These tests need no server: the records themselves, the versions they were checked
against, the rule over the package's source, and the hooks installing a driver they
have never heard of.
"""

from __future__ import annotations

import ast
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pytest_poolaware
from pytest_poolaware.shared.compat import DRIVERS_TESTED
from pytest_poolaware.worker.drivers import DRIVERS, HOOKED_INTERNALS, Driver, DriverHooks
from pytest_poolaware.worker.drivers.base import Hook, HookedInternal, Hooking

ROOT = Path(pytest_poolaware.__file__).parent
#: The pins of the matrix's two ends, beside the tests (the package may be installed elsewhere).
CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints"
#: The drivers' package: the one place their names may be compared.
DRIVERS_PACKAGE = ROOT / "worker" / "drivers"
#: Comparisons outside it that are not about a connection's driver: the engine helper
#: picks its default URLs' driver (and the ``connect_args`` that driver takes).
EXEMPT = {("engine.py", "asyncpg")}


def driver_names(drivers: tuple[Driver, ...] = DRIVERS) -> set[str]:
    """Every name a driver goes by: its own, its modules', SQLAlchemy's."""
    names: set[str] = set()
    for driver in drivers:
        names.update((driver.name, *driver.modules, *driver.sqlalchemy))
    return names


def _named(node: ast.AST, names: set[str]) -> Iterator[str]:
    """The driver names a literal operand holds (a string, or a collection of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        if node.value in names or node.value.split(".")[0] in names:
            yield node.value
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        for element in node.elts:
            yield from _named(element, names)


def _compared(node: ast.AST) -> list[ast.AST]:
    """The operands a node compares, tests a prefix of, matches or looks up by."""
    if isinstance(node, ast.Compare):
        return [node.left, *node.comparators]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("startswith", "endswith")
    ):
        return list(node.args)
    if isinstance(node, ast.MatchValue):
        return [node.value]
    if isinstance(node, ast.Subscript):
        return [node.slice]
    return []


def names_compared(root: Path, names: set[str]) -> list[tuple[str, int, str]]:
    """(file, line, name) of each driver name compared outside the drivers' package."""
    found: list[tuple[str, int, str]] = []
    for path in sorted(root.rglob("*.py")):
        if DRIVERS_PACKAGE.name in path.relative_to(root).parts[:-1]:
            continue
        relative = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            line = getattr(node, "lineno", 0)
            for operand in _compared(node):
                found.extend((relative, line, name) for name in _named(operand, names))
    return found


def test_no_driver_name_is_compared_outside_the_drivers_package() -> None:
    found = names_compared(ROOT, driver_names())
    assert [f for f in found if (f[0], f[2]) not in EXEMPT] == []
    # The rule does see the engine helper's own comparison.
    assert {(f[0], f[2]) for f in found} == EXEMPT


def test_a_driver_name_compared_in_the_worker_is_caught(tmp_path: Path) -> None:
    copy = tmp_path / "pytest_poolaware"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    planted = copy / "worker" / "reclaim.py"
    planted.write_text(
        planted.read_text()
        + "\n\ndef _which(pool, driver):\n"
        + '    if type(pool).__module__.startswith("asyncpg.pool"):\n'
        + "        return 1\n"
        + '    return driver in ("psycopg", "other")\n'
    )
    found = [f for f in names_compared(copy, driver_names()) if (f[0], f[2]) not in EXEMPT]
    assert [(file, name) for file, _, name in found] == [
        ("worker/reclaim.py", "asyncpg.pool"),
        ("worker/reclaim.py", "psycopg"),
    ]


# -- the records ------------------------------------------------------------------------------


def test_each_driver_goes_by_its_own_names() -> None:
    for attribute in ("name", "modules", "sqlalchemy"):
        seen: list[str] = []
        for driver in DRIVERS:
            value = getattr(driver, attribute)
            seen.extend(value if isinstance(value, tuple) else [value])
        assert len(seen) == len(set(seen)), attribute
    assert all(driver.hooks and driver.internals for driver in DRIVERS)


def test_every_driver_s_internals_name_versions_checked_at_the_matrix_ends() -> None:
    """Each internal's package is in ``DRIVERS_TESTED``, whose ends are the pins of
    ``tox -e oldest`` and ``tox -e newest``."""
    assert {internal.package for internal in HOOKED_INTERNALS} == set(DRIVERS_TESTED)
    ends = [pins(CONSTRAINTS / f"{end}.txt") for end in ("oldest", "newest")]
    for package, tested in DRIVERS_TESTED.items():
        assert (ends[0][package], ends[1][package]) == tested, package


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        package, _, version = line.split("#")[0].strip().partition("==")
        if version:
            found[package.lower()] = version
    return found


# -- a driver the hooks never heard of ---------------------------------------------------------


class Sink:
    """What the hooks report, kept."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def gate(self, background: bool) -> None:
        self.events.append(("gate", background))

    async def gate_async(self, background: bool) -> None:
        self.events.append(("gate", background))

    def opened(self, conn: Any, pid: int, driver: str, pool: Any) -> None:
        self.events.append(("opened", (pid, driver)))

    def closed(self, pid: int, key: int) -> None:
        self.events.append(("closed", pid))

    def lent(self, conn: Any, in_use: bool) -> None:
        self.events.append(("lent", in_use))


TOY_MODULE = "poolaware_toy_driver"
TOY_SOURCE = """
class Connection:
    def __init__(self, pid):
        self.pid = pid
        self.closed = False

def connect(pid):
    return Connection(pid)
"""


def _install_toy(hooking: Hooking) -> None:
    toy = sys.modules[TOY_MODULE]
    connect = toy.connect

    def _connect(pid: int) -> Any:
        hooking.sink.gate(False)
        conn = connect(pid)
        hooking.sink.opened(conn, pid, hooking.driver.name, None)
        return conn

    hooking.patch(toy, "connect", _connect)


def _broken_install(hooking: Hooking) -> None:
    hooking.patch(sys.modules[TOY_MODULE], "connect", lambda pid: None)
    raise AttributeError("Connection._internal")  # a release that moved an internal


def toy(install: Any) -> Driver:
    return Driver(
        name="toy",
        hooks=(Hook(TOY_MODULE, install),),
        sqlalchemy=("toy",),
        backend_pid=lambda conn: int(conn.pid),
        fileno=lambda conn: -1,
        is_closed=lambda conn: bool(conn.closed),
        close_hooked=False,
        login=lambda conn: None,
        internals=(HookedInternal("toy", "connect", "where every connection is made"),),
    )


@pytest.fixture
def toy_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    (tmp_path / f"{TOY_MODULE}.py").write_text(TOY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop(TOY_MODULE, None)


@pytest.mark.usefixtures("toy_module")
def test_a_driver_is_hooked_from_its_record_when_its_module_is_imported() -> None:
    sink, errors = Sink(), list[BaseException]()
    hooks = DriverHooks(sink, errors.append, drivers=(toy(_install_toy),))
    hooks.install()
    try:
        assert not hooks.sees("toy")
        import poolaware_toy_driver  # type: ignore[import-not-found]

        assert hooks.sees("toy")
        poolaware_toy_driver.connect(7)
        assert sink.events == [("gate", False), ("opened", (7, "toy"))]
    finally:
        hooks.uninstall()
    poolaware_toy_driver.connect(8)  # unhooked: nothing more reported
    assert len(sink.events) == 2
    assert errors == []


@pytest.mark.usefixtures("toy_module")
def test_a_driver_whose_internals_moved_is_left_as_it_was_with_the_error_told() -> None:
    import poolaware_toy_driver

    original = poolaware_toy_driver.connect
    errors: list[BaseException] = []
    hooks = DriverHooks(Sink(), errors.append, drivers=(toy(_broken_install),))
    hooks.install()
    hooks.uninstall()
    assert poolaware_toy_driver.connect is original
    assert [str(error) for error in errors] == ["Connection._internal"]
