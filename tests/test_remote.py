"""Workers reached through other gateways than local popen: the budget holds over all of
them, and the server is learned from their connections as from local ones."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from inner import execnet_socket_servers, run
from test_learning import APP_CONFTEST, assert_learned_and_kept
from test_scheduling import SUITE

from pytest_poolaware.server.learning import names_its_own_machine, on_this_machine

WORKERS = 4


@pytest.fixture
def app_env(secret_role: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """The suite connects through its own variable; the plugin is told nothing."""
    dsn, role = secret_role
    monkeypatch.setenv("APP_DSN", dsn)
    monkeypatch.setenv("POOLAWARE_TEST_LOG", os.devnull)
    for name in ("POOLAWARE_DSN", "PG_POOL_SIZE", "PG_MAX_OVERFLOW", "PG_POOL_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    return role


@pytest.fixture
def suite(pytester: pytest.Pytester, app_env: str) -> str:
    pytester.makeconftest(APP_CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    return app_env


@pytest.fixture
def socket_servers(app_env: str) -> Iterator[list[str]]:
    """execnet socket servers on localhost, one per worker, started with the suite's
    environment (``app_env``) as a machine of its own would have it."""
    with execnet_socket_servers(WORKERS) as addresses:
        yield addresses


def test_the_server_is_learned_from_workers_behind_socket_gateways(
    pytester: pytest.Pytester, suite: str, socket_servers: list[str]
) -> None:
    root = pytester.path
    tx = [arg for address in socket_servers for arg in ("--tx", f"socket={address}//chdir={root}")]
    result = run(pytester, "--dist", "poolaware", *tx, "--cache-clear")
    assert_learned_and_kept(result, suite)


#: Appended to the suite's conftest: each worker writes down which Python runs it.
PYTHON_RECORDING = """

def pytest_configure(config):
    import sys
    if hasattr(config, "workerinput"):
        with open({path!r}, "a") as record:
            record.write(sys.executable + "\\n")
"""


@pytest.fixture
def other_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another Python executable: a virtual environment of its own whose packages are
    this one's (the plugin, pytest-xdist, the drivers), added as a site directory."""
    home = tmp_path_factory.mktemp("other-python")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True)
    python = home / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    lines = [f"import site; site.addsitedir({path!r})" for path in ours]
    (Path(purelib) / "parent_packages.pth").write_text("\n".join(lines) + "\n")
    return python


def test_the_server_is_learned_from_workers_on_another_python(
    pytester: pytest.Pytester, suite: str, other_python: Path
) -> None:
    pythons = pytester.path / "pythons.txt"
    pytester.makeconftest(APP_CONFTEST + PYTHON_RECORDING.format(path=str(pythons)))
    tx = f"{WORKERS}*popen//python={other_python}"
    result = run(pytester, "--dist", "poolaware", "--tx", tx, "--cache-clear")
    assert_learned_and_kept(result, suite)
    # Every worker ran the other Python, not this one.
    assert pythons.read_text().split() == [str(other_python)] * WORKERS
    assert str(other_python) != sys.executable


def test_a_remote_worker_naming_its_own_machine_is_not_believed(
    pytester: pytest.Pytester, suite: str
) -> None:
    """An address like localhost seen by a worker on another machine would name another
    server on the controller's: the configured budget is kept, with a note."""
    assert names_its_own_machine("localhost")
    assert names_its_own_machine("127.0.0.1")
    assert names_its_own_machine("::1")
    assert names_its_own_machine("/var/run/postgresql")
    assert not names_its_own_machine("db.example")
    assert not names_its_own_machine("10.1.2.3")

    class Spec:
        popen = False
        socket: str | None = None

    remote, local, ssh = Spec(), Spec(), Spec()
    remote.socket, local.socket = "192.0.2.7:8888", "127.0.0.1:8888"
    assert not on_this_machine(remote)
    assert on_this_machine(local)
    assert not on_this_machine(ssh)
