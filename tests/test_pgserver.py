"""The throwaway server, roles and the command-line wrapper, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import re
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pytest_poolaware import pgserver
from pytest_poolaware.settings import ENV_DSN

SRC_DIR = Path(pgserver.__file__).resolve().parents[1]


def make_bindir(directory: Path, programs: tuple[str, ...] = pgserver.SERVER_PROGRAMS) -> Path:
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


def expected_server_uid() -> int:
    """Root hands the server to the first existing unprivileged account; others run it as is."""
    if os.geteuid() != 0:
        return os.geteuid()
    for name in pgserver.UNPRIVILEGED_ACCOUNTS:
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
    pytest.fail("no unprivileged account to compare with")


# --- finding the server programs --------------------------------------------------------------


def test_find_prefers_path(tmp_path: Path) -> None:
    on_path = make_bindir(tmp_path / "path")
    make_bindir(tmp_path / "lib" / "99" / "bin")
    search = [str(tmp_path / "lib" / "*" / "bin")]
    assert pgserver.find_server_binaries(path=str(on_path), search_dirs=search) == on_path


def test_find_picks_newest_complete_version_numerically(tmp_path: Path) -> None:
    for version in ("9.6", "10", "15"):
        make_bindir(tmp_path / version / "bin")
    make_bindir(tmp_path / "16" / "bin", ("initdb", "postgres"))  # incomplete: skipped
    found = pgserver.find_server_binaries(path="", search_dirs=[str(tmp_path / "*" / "bin")])
    assert found == tmp_path / "15" / "bin"


def test_find_reports_what_to_install(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(pgserver.PostgresNotFound) as caught:
        pgserver.find_server_binaries(path=str(empty), search_dirs=[str(tmp_path / "*" / "bin")])
    message = str(caught.value)
    assert "apt-get install postgresql" in message
    assert "POOLAWARE_DSN" in message


def test_find_on_this_machine() -> None:
    bindir = pgserver.find_server_binaries()
    assert all((bindir / name).is_file() for name in pgserver.SERVER_PROGRAMS)


# --- the server itself ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_server() -> Iterator[pgserver.ThrowawayPostgres]:
    """A server of our own, whatever ``POOLAWARE_DSN`` says: these tests are about it."""
    with pgserver.ThrowawayPostgres(max_connections=37) as server:
        yield server


def test_server_settings(private_server: pgserver.ThrowawayPostgres) -> None:
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


def test_server_runs_unprivileged(private_server: pgserver.ThrowawayPostgres) -> None:
    data_dir, postmaster, _ = server_facts(private_server.dsn)
    uid = expected_server_uid()
    assert data_dir.stat().st_uid == uid
    assert Path(f"/proc/{postmaster}").stat().st_uid == uid


def test_stop_leaves_nothing_behind() -> None:
    server = pgserver.ThrowawayPostgres(max_connections=10)
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


def test_start_failure_shows_log_and_cleans_up() -> None:
    bad = "0 is outside the valid range for parameter"
    before = set(glob.glob("/tmp/poolaware-pg-*"))
    with pytest.raises(pgserver.PostgresStartError, match=bad):
        pgserver.ThrowawayPostgres(max_connections=0).start()
    # Other sessions may be starting servers meanwhile: look only for one that failed like ours.
    leftovers = []
    for directory in set(glob.glob("/tmp/poolaware-pg-*")) - before:
        try:
            if bad in (Path(directory) / "server.log").read_text(errors="replace"):
                leftovers.append(directory)
        except OSError:
            continue
    assert leftovers == []


def test_crashed_caller_leaves_no_server(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        from pathlib import Path
        import psycopg
        from pytest_poolaware.pgserver import ThrowawayPostgres

        dsn = ThrowawayPostgres(max_connections=10).start()
        with psycopg.connect(dsn) as conn:
            data_dir = Path(conn.execute("SELECT current_setting('data_directory')").fetchone()[0])
        print(data_dir, (data_dir / "postmaster.pid").read_text().split()[0], flush=True)
        raise RuntimeError("caller crashed")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert "caller crashed" in result.stderr
    data_dir, pid = result.stdout.split()
    leaked = [Path(data_dir).parent.exists(), is_running(int(pid))]
    if leaked[1]:  # the test failed: do not leave the server behind for the rest of the run
        os.kill(int(pid), signal.SIGQUIT)
    assert leaked == [False, False]


def test_postgres_dsn_prefers_environment() -> None:
    given = "postgresql://someone@db.invalid:5/elsewhere"
    with pgserver.postgres_dsn({ENV_DSN: given}) as dsn:
        assert dsn == given


def test_postgres_dsn_starts_and_stops_a_server() -> None:
    with pgserver.postgres_dsn({ENV_DSN: ""}) as dsn:
        data_dir, postmaster, _ = server_facts(dsn)
    assert not data_dir.exists()
    assert not is_running(postmaster)


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
        pgserver.create_role(postgres_dsn, role, connection_limit=1)
        dsn = pgserver.create_role(postgres_dsn, role, connection_limit=5, password=secret)
        assert secret not in pgserver.mask_dsn(dsn)
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        with psycopg.connect(postgres_dsn) as conn:
            row = conn.execute(
                "SELECT rolconnlimit, rolpassword IS NOT NULL FROM pg_authid WHERE rolname = %s",
                (role,),
            ).fetchone()
        assert row == (5, True)
    finally:
        pgserver.drop_role(postgres_dsn, role)
    with psycopg.connect(postgres_dsn) as conn:
        gone = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,))
        assert gone.fetchone() == (0,)


# --- DSNs and the command line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://u:s3cret@h:5/db", "postgresql://u:***@h:5/db"),
        ("postgresql://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
        ("postgresql://u@h/db?password=s3cret&x=1", "postgresql://u@h/db?password=***&x=1"),
        ("host=h password='unterminated", "***"),
    ],
)
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert pgserver.mask_dsn(dsn) == masked


def test_mask_keyword_dsn() -> None:
    masked = pgserver.mask_dsn("host=h user=u password='s3 cret'")
    assert conninfo_to_dict(masked) == {"host": "h", "user": "u", "password": "***"}


def test_main_runs_command_with_dsn(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DSN, postgres_dsn)
    check = "import os, sys; sys.exit(7 if os.environ['POOLAWARE_DSN'] == sys.argv[1] else 3)"
    assert pgserver.main(["--", sys.executable, "-c", check, postgres_dsn]) == 7


def test_main_reports_a_missing_command(
    postgres_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_DSN, postgres_dsn)
    assert pgserver.main(["--", str(tmp_path / "no-such-command")]) == 127


def test_main_starts_a_server_for_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_DSN, raising=False)
    query = "import os, psycopg; psycopg.connect(os.environ['POOLAWARE_DSN']).close()"
    assert pgserver.main(["--", sys.executable, "-c", query]) == 0


def test_main_without_postgres_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(ENV_DSN, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(pgserver, "SEARCH_DIRS", [str(tmp_path / "*" / "bin")])
    assert pgserver.main(["--", sys.executable, "-c", "pass"]) == 2
    err = capsys.readouterr().err
    assert "apt-get install postgresql" in err
    assert "Traceback" not in err
