"""A private PostgreSQL in a temporary directory, on a free port, gone when stopped or at exit."""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Final, TypedDict

import port_for
from mirakuru import AlreadyRunning, Executor, ExecutorError, ProcessExitedWithError, TimeoutExpired
from mirakuru.base import ENV_UUID

from pytest_poolaware.shared.settings import ENV_DSN

from .accounts import can_traverse, server_account
from .binaries import ServerBinaries, find_server_binaries
from .errors import PostgresStartError

SUPERUSER: Final = "postgres"
#: Durability is worthless for a server that is deleted afterwards; these make it fast.
FAST_SETTINGS: Final = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
#: Longest wait for the server to accept connections, and for it to shut down.
START_TIMEOUT: Final = 30.0
POLL_INTERVAL: Final = 0.05
#: Ports tried: another process may take the one we picked before the server binds it.
START_ATTEMPTS: Final = 3
LOG_TAIL_LINES: Final = 20
PORT_TAKEN: Final = "Address already in use"
#: A fast shutdown: sessions are ended, nothing waits for clients.
FAST_SHUTDOWN: Final = signal.SIGINT
#: Whoever is not root may look into the server's directory, not write into it.
SHARED_DIR_MODE: Final = 0o755


class _RunAs(TypedDict):
    """Popen arguments that run a program as the server's account."""

    user: int | None
    group: int | None
    extra_groups: list[int] | None


class _Postmaster(Executor):
    """The postmaster as mirakuru runs it, in a session of its own (a Ctrl-C meant for the
    caller must not shut the server down under it); ready when ``ready()`` says so."""

    def __init__(
        self,
        command: list[str],
        *,
        port: int,
        ready: Callable[[], bool],
        log: IO[bytes],
        cwd: Path,
        run_as: _RunAs,
    ) -> None:
        super().__init__(
            command,
            cwd=str(cwd),
            timeout=START_TIMEOUT,
            sleep=POLL_INTERVAL,
            stop_signal=FAST_SHUTDOWN,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            popen_kwargs=dict(run_as),
        )
        self._port = port
        self._ready = ready

    @property
    def envvars(self) -> dict[str, str]:
        """Our environment without mirakuru's marker variable.

        Every process that imports mirakuru kills, as it exits, the processes whose marker
        contains its own pid's digits; a marker is a pid and a uuid, so some unrelated
        exit would kill the server. The server's session is stopped as a group instead.
        """
        env = super().envvars
        env.pop(ENV_UUID, None)
        return env

    def pre_start_check(self) -> bool:
        return port_for.port_is_used(self._port)

    def after_start_check(self) -> bool:
        return self._ready()


class ThrowawayPostgres:
    """A private PostgreSQL cluster in a temporary directory, deleted by :meth:`stop`.

    ``binaries`` defaults to :func:`find_server_binaries`; ``environ`` is read for the
    choice of programs and of the account (see :mod:`poolaware_testserver.accounts`).
    """

    def __init__(
        self,
        *,
        max_connections: int = 200,
        binaries: ServerBinaries | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.max_connections = max_connections
        self._given = binaries
        self._binaries: ServerBinaries | None = None
        self._environ = environ
        self._account: pwd.struct_passwd | None = None
        self._tempdir: Path | None = None
        self._postmaster: _Postmaster | None = None
        self._log: IO[bytes] | None = None
        self._dsn: str | None = None

    @property
    def dsn(self) -> str:
        """Superuser DSN of the running server."""
        if self._dsn is None:
            raise RuntimeError("the server is not running; call start() first")
        return self._dsn

    @property
    def binaries(self) -> ServerBinaries:
        """The programs the server runs from (a staged copy when its account needed one)."""
        if self._binaries is None:
            raise RuntimeError("the server is not running; call start() first")
        return self._binaries

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
        binaries = self._given or find_server_binaries(self._environ)
        self._account = server_account(self._environ)
        # /tmp, not $TMPDIR: the account must reach it and the socket path must stay short.
        self._tempdir = Path(tempfile.mkdtemp(prefix="poolaware-pg-", dir="/tmp"))
        atexit.register(self.stop)
        try:
            if self._account is not None:
                self._tempdir.chmod(SHARED_DIR_MODE)
            for name in ("data", "socket"):
                self._path(name).mkdir()
                if self._account is not None:
                    os.chown(self._path(name), self._account.pw_uid, self._account.pw_gid)
            account = self._account
            if (
                account is not None
                and binaries.package_dir is not None
                and not can_traverse(binaries.bindir, account)
            ):
                # Root-owned, outside the account's data: it may run them, not change them.
                binaries = binaries.staged(self._path("binaries"))
            self._binaries = binaries
            self._initdb()
            for _attempt in range(START_ATTEMPTS):
                port = port_for.select_random()
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
        postmaster, self._postmaster = self._postmaster, None
        if postmaster is not None:
            # A server that died on its own exits non-zero: nothing left to stop then.
            with contextlib.suppress(ExecutorError):
                postmaster.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None
        self._binaries = None
        self._dsn = None
        atexit.unregister(self.stop)

    def _path(self, *parts: str) -> Path:
        assert self._tempdir is not None, "not started"
        return self._tempdir.joinpath(*parts)

    def _program(self, name: str) -> str:
        return self.binaries.program(name)

    def _run_as(self) -> _RunAs:
        """Drop root to the server's account, supplementary groups included."""
        if self._account is None:
            return _RunAs(user=None, group=None, extra_groups=None)
        account = self._account
        return _RunAs(user=account.pw_uid, group=account.pw_gid, extra_groups=[])

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
        # cwd: the account may not be able to enter ours, and initdb insists on reading it.
        result = subprocess.run(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
            cwd=self._path("data"),
            **self._run_as(),
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
        postmaster = _Postmaster(
            command,
            port=port,
            ready=lambda: self._ready(port),
            log=self._log,
            cwd=self._path("data"),
            run_as=self._run_as(),
        )
        try:
            postmaster.start()
        except ProcessExitedWithError:
            if PORT_TAKEN in self._log_tail(since=log_start):
                return False
            raise PostgresStartError(
                f"PostgreSQL exited while starting:\n{self._log_tail()}"
            ) from None
        except TimeoutExpired:
            raise PostgresStartError(
                f"PostgreSQL not ready after {START_TIMEOUT:g} s:\n{self._log_tail()}"
            ) from None
        except AlreadyRunning:  # something else listens on the port
            return False
        self._postmaster = postmaster
        return True

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

    def _log_tail(self, since: int = 0) -> str:
        try:
            with self._path("server.log").open("rb") as log:
                log.seek(since)
                lines = log.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(lines[-LOG_TAIL_LINES:])


@contextlib.contextmanager
def postgres_dsn(environ: Mapping[str, str] = os.environ) -> Iterator[str]:
    """The server named by ``POOLAWARE_DSN``, else a throwaway one for the duration."""
    configured = environ.get(ENV_DSN, "")
    if configured.strip():
        yield configured
        return
    with ThrowawayPostgres(environ=environ) as server:
        yield server.dsn
