"""Throwaway PostgreSQL servers for the demo, the benchmarks and the test suite."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Final, TypedDict
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from .settings import ENV_DSN

if TYPE_CHECKING:
    import psycopg

#: Programs a directory must hold to run a server of its own (pg_isready ships beside them).
SERVER_PROGRAMS: Final = ("initdb", "pg_ctl", "postgres", "pg_isready")
#: Where distributions put the server programs when they are not on PATH (patterns, in order).
SEARCH_DIRS: Sequence[str] = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin")
#: Accounts the server runs as when we are root: initdb and postgres refuse to run as root.
UNPRIVILEGED_ACCOUNTS: Final = ("postgres", "nobody")
SUPERUSER: Final = "postgres"
#: Durability is worthless for a server that is deleted afterwards; these make it fast.
FAST_SETTINGS: Final = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 30.0
POLL_INTERVAL: Final = 0.05
START_ATTEMPTS: Final = 3
LOG_TAIL_LINES: Final = 20
#: Advisory lock key held while creating or dropping roles ("poolawar" in ASCII).
ROLE_LOCK_KEY: Final = 0x706F6F6C61776172


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server programs were found on this machine."""

    def __init__(self, searched: Iterable[str] = ()) -> None:
        where = ", ".join(searched) or "nowhere"
        super().__init__(
            f"PostgreSQL server programs ({', '.join(SERVER_PROGRAMS)}) not found "
            f"(searched PATH and {where}). Install them (Debian/Ubuntu: "
            f"apt-get install postgresql) or set {ENV_DSN} to the DSN of an existing server."
        )


class PostgresStartError(RuntimeError):
    """The throwaway server did not come up; the message ends with its log."""


def _version_key(bindir: str) -> tuple[int, ...]:
    """Numeric version of ``.../<version>/bin`` so that 10 sorts above 9.6."""
    return tuple(int(part) for part in re.findall(r"\d+", Path(bindir).parent.name))


def _has_programs(directory: str | Path) -> bool:
    return all(shutil.which(name, path=str(directory)) for name in SERVER_PROGRAMS)


def find_server_binaries(
    *, path: str | None = None, search_dirs: Iterable[str] | None = None
) -> Path:
    """Directory holding initdb, pg_ctl and postgres: PATH first, then the newest known install.

    ``path`` defaults to ``$PATH`` and ``search_dirs`` (glob patterns) to :data:`SEARCH_DIRS`.
    """
    search_path = os.environ.get("PATH", os.defpath) if path is None else path
    for entry in search_path.split(os.pathsep):
        if entry and _has_programs(entry):
            return Path(entry)
    patterns = list(SEARCH_DIRS if search_dirs is None else search_dirs)
    for pattern in patterns:
        for candidate in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            if _has_programs(candidate):
                return Path(candidate)
    raise PostgresNotFound(patterns)


def _free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (another process may take it before us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _RunAs(TypedDict):
    """Popen arguments that run a program as the server's account."""

    cwd: Path
    user: int | None
    group: int | None
    extra_groups: list[int] | None


def _unprivileged_account() -> pwd.struct_passwd | None:
    """The account to run the server as, or None when we may run it ourselves."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_ACCOUNTS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresStartError(
        f"running as root, and none of the accounts {', '.join(UNPRIVILEGED_ACCOUNTS)} "
        "exists to run PostgreSQL as (it refuses to run as root)"
    )


class ThrowawayPostgres:
    """A private PostgreSQL cluster in a temporary directory, deleted by :meth:`stop`."""

    def __init__(self, *, max_connections: int = 200, bindir: Path | None = None) -> None:
        self.max_connections = max_connections
        self._bindir = bindir
        self._account: pwd.struct_passwd | None = None
        self._tempdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._dsn: str | None = None

    @property
    def dsn(self) -> str:
        """Superuser DSN of the running server."""
        if self._dsn is None:
            raise RuntimeError("the server is not running; call start() first")
        return self._dsn

    def __enter__(self) -> ThrowawayPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> str:
        """Create the cluster, start the server, wait until it accepts connections."""
        if self._dsn is not None:
            return self._dsn
        self._bindir = self._bindir or find_server_binaries()
        self._account = _unprivileged_account()
        # /tmp, not $TMPDIR: the account must reach it and the socket path must stay short.
        self._tempdir = Path(tempfile.mkdtemp(prefix="poolaware-pg-", dir="/tmp"))
        atexit.register(self.stop)
        try:
            (self._tempdir / "socket").mkdir()
            if self._account is not None:
                for item in (self._tempdir, self._tempdir / "socket"):
                    os.chown(item, self._account.pw_uid, self._account.pw_gid)
            self._initdb()
            for _attempt in range(START_ATTEMPTS):
                port = _free_port()
                if self._start_server(port):
                    self._dsn = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"
                    return self._dsn
            raise PostgresStartError(
                f"no free port after {START_ATTEMPTS} attempts:\n{self._log_tail()}"
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Shut the server down fast and delete its files; safe to call more than once."""
        process, self._process = self._process, None
        if process is not None:
            self._shutdown(process)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None
        self._dsn = None
        atexit.unregister(self.stop)

    def _path(self, *parts: str) -> Path:
        assert self._tempdir is not None, "not started"
        return self._tempdir.joinpath(*parts)

    def _program(self, name: str) -> str:
        assert self._bindir is not None, "not started"
        return str(self._bindir / name)

    def _run_as(self) -> _RunAs:
        """Drop root to the server's account, supplementary groups included."""
        # cwd: the account may not be able to enter ours, and initdb insists on reading it.
        if self._account is None:
            return _RunAs(cwd=self._path(), user=None, group=None, extra_groups=None)
        account = self._account
        return _RunAs(cwd=self._path(), user=account.pw_uid, group=account.pw_gid, extra_groups=[])

    def _initdb(self) -> None:
        command = [
            self._program("initdb"),
            f"--pgdata={self._path('data')}",
            f"--username={SUPERUSER}",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        result = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False, **self._run_as()
        )
        if result.returncode != 0:
            output = result.stdout.decode(errors="replace")
            raise PostgresStartError(f"initdb failed ({result.returncode}):\n{output}")

    def _start_server(self, port: int) -> bool:
        """Start the postmaster on ``port``; False when the port was taken meanwhile."""
        if self._log is None:
            self._log = self._path("server.log").open("ab")
        log_start = self._log.tell()
        settings = [
            *FAST_SETTINGS,
            f"max_connections={self.max_connections}",
            "listen_addresses=127.0.0.1",
            f"unix_socket_directories={self._path('socket')}",
        ]
        command = [self._program("postgres"), "-D", str(self._path("data")), "-p", str(port)]
        for setting in settings:
            command += ["-c", setting]
        # Own session: a Ctrl-C meant for the caller must not shut the server down under it.
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **self._run_as(),
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                if "Address already in use" in self._log_tail(since=log_start):
                    return False
                raise PostgresStartError(f"PostgreSQL exited while starting:\n{self._log_tail()}")
            if self._ready(port):
                return True
            time.sleep(POLL_INTERVAL)
        raise PostgresStartError(
            f"PostgreSQL not ready after {START_TIMEOUT:g} s:\n{self._log_tail()}"
        )

    def _ready(self, port: int) -> bool:
        """Ask through our own socket directory, so a stranger on the port cannot answer."""
        probe = [
            self._program("pg_isready"),
            f"--host={self._path('socket')}",
            f"--port={port}",
            f"--username={SUPERUSER}",
            "--dbname=postgres",
            "--timeout=1",
        ]
        return subprocess.run(probe, capture_output=True, check=False).returncode == 0

    def _shutdown(self, process: subprocess.Popen[bytes]) -> None:
        """``pg_ctl stop -m fast``; kill the server's whole session if that is not enough."""
        if process.poll() is None:
            command = [self._program("pg_ctl"), "stop", "-D", str(self._path("data"))]
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [*command, "-m", "fast", "-w", f"--timeout={int(STOP_TIMEOUT)}"],
                    capture_output=True,
                    check=False,
                    timeout=STOP_TIMEOUT + 5,
                    **self._run_as(),
                )
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def _log_tail(self, since: int = 0) -> str:
        try:
            with self._path("server.log").open("rb") as log:
                log.seek(since)
                lines = log.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(lines[-LOG_TAIL_LINES:])


def _url_with(dsn: str, userinfo: str | None, query: Callable[[str, str], str | None]) -> str:
    """Rebuild a ``postgresql://`` URL with new userinfo (None: keep) and filtered query."""
    parts = urlsplit(dsn)
    old_userinfo, _, hostport = parts.netloc.rpartition("@")
    if userinfo is None:
        userinfo = old_userinfo
    netloc = f"{userinfo}@{hostport}" if userinfo else hostport
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(key, new) for key, value in pairs if (new := query(key, value)) is not None]
    new_query = parts.query if kept == pairs else urlencode(kept, safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=new_query))


def _with_credentials(dsn: str, user: str, password: str | None) -> str:
    """The same DSN for another user, keeping its form (URL or key=value)."""
    if "://" in dsn:
        userinfo = quote(user, safe="")
        if password is not None:
            userinfo += ":" + quote(password, safe="")
        credentials = ("user", "password")
        return _url_with(dsn, userinfo, lambda key, value: None if key in credentials else value)
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    params.pop("password", None)
    params["user"] = user
    if password is not None:
        params["password"] = password
    return make_conninfo("", **params)


@contextlib.contextmanager
def _role_lock(dsn: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """A transaction that has the role lock: concurrent GRANTs on one database fail otherwise."""
    import psycopg

    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (ROLE_LOCK_KEY,))
        yield conn


def create_role(
    dsn: str, role: str, *, connection_limit: int | None = None, password: str | None = None
) -> str:
    """Create (or reset) a LOGIN non-superuser role and return a DSN that logs in as it.

    The role gets ALL privileges on the DSN's database and on its ``public`` schema, so it
    can create tables there without owning the database. ``connection_limit=None`` means
    unlimited; an existing role is altered to match, so calling this twice is harmless.
    """
    from psycopg import sql

    options = sql.SQL(
        "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE CONNECTION LIMIT {limit} PASSWORD {password}"
    ).format(
        limit=sql.Literal(-1 if connection_limit is None else connection_limit),
        password=sql.Literal(password),
    )
    name = sql.Identifier(role)
    with _role_lock(dsn) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        verb = sql.SQL("ALTER" if exists else "CREATE")
        conn.execute(sql.SQL("{} ROLE {} WITH {}").format(verb, name, options))
        database = sql.Identifier(conn.info.dbname)
        conn.execute(sql.SQL("GRANT ALL ON DATABASE {} TO {}").format(database, name))
        conn.execute(sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(name))
    return _with_credentials(dsn, role, password)


def drop_role(dsn: str, role: str) -> None:
    """Disconnect and drop a role made by :func:`create_role`, with what it owns in the DSN's DB."""
    from psycopg import sql

    name = sql.Identifier(role)
    with _role_lock(dsn) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
            return
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        conn.execute(sql.SQL("DROP OWNED BY {}").format(name))
        conn.execute(sql.SQL("DROP ROLE {}").format(name))


def mask_dsn(dsn: str) -> str:
    """The DSN with any password shown as ``***``; all of it masked when it cannot be parsed."""
    try:
        if "://" in dsn:
            parts = urlsplit(dsn)
            userinfo = parts.netloc.rpartition("@")[0]
            if parts.password is not None:
                userinfo = userinfo.partition(":")[0] + ":***"
            return _url_with(
                dsn, userinfo, lambda key, value: "***" if key == "password" else value
            )
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(dsn)
        if "password" in params:
            params["password"] = "***"
        return make_conninfo("", **params)
    except Exception:
        return "***"


@contextlib.contextmanager
def postgres_dsn(environ: Mapping[str, str] = os.environ) -> Iterator[str]:
    """The server named by ``POOLAWARE_DSN``, else a throwaway one for the duration."""
    configured = environ.get(ENV_DSN, "")
    if configured.strip():
        yield configured
        return
    with ThrowawayPostgres() as server:
        yield server.dsn


def main(argv: list[str] | None = None) -> int:
    """Run a command with ``POOLAWARE_DSN`` pointing at a throwaway server; return its status."""
    parser = argparse.ArgumentParser(
        prog="python -m pytest_poolaware.pgserver",
        description=f"Run CMD with {ENV_DSN} set, starting a throwaway PostgreSQL "
        f"unless {ENV_DSN} is already set.",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    command: list[str] = parser.parse_args(argv).command
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        parser.error("no command given")
    try:
        with postgres_dsn() as dsn:
            try:
                process = subprocess.Popen(command, env={**os.environ, ENV_DSN: dsn})
            except OSError as exc:
                print(f"error: cannot run {command[0]!r}: {exc}", file=sys.stderr)
                return 127
            with process:
                try:
                    status = process.wait()
                except KeyboardInterrupt:
                    # The command got the same Ctrl-C: let it finish before the server goes.
                    status = process.wait()
            # Like a shell: death by signal N is 128 + N.
            return status if status >= 0 else 128 - status
    except (PostgresNotFound, PostgresStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
