"""The account the server runs as: initdb and postgres refuse to run as root."""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from .errors import PostgresStartError

#: Names the account the server runs as when we are root.
ENV_ACCOUNT: Final = "POOLAWARE_PG_ACCOUNT"
DEFAULT_ACCOUNT: Final = "postgres"
#: Present on practically every Unix system, so a fresh machine without a postgres account works.
FALLBACK_ACCOUNT: Final = "nobody"


def server_account(environ: Mapping[str, str] = os.environ) -> pwd.struct_passwd | None:
    """The account to run the server as, or None when we may run it ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    wanted = environ.get(ENV_ACCOUNT, "").strip() or DEFAULT_ACCOUNT
    names = list(dict.fromkeys((wanted, FALLBACK_ACCOUNT)))
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresStartError(
        f"running as root, and none of the accounts {', '.join(names)} exists to run "
        f"PostgreSQL as (it refuses to run as root): create one (useradd --system postgres), "
        f"name an existing one in {ENV_ACCOUNT}, or run as an ordinary user"
    )


def can_traverse(path: Path, account: pwd.struct_passwd) -> bool:
    """Whether ``account`` (with its primary group only) may reach ``path``.

    Only directories' search bits are looked at: a virtualenv under a home directory that
    is closed to others (``/root``) fails here, whatever the files' own modes.
    """
    chains = {path.absolute(), path.resolve()}
    for end in chains:
        for directory in (end, *end.parents):
            try:
                info = directory.stat()
            except OSError:
                return False
            if info.st_uid == account.pw_uid:
                bit = stat.S_IXUSR
            elif info.st_gid == account.pw_gid:
                bit = stat.S_IXGRP
            else:
                bit = stat.S_IXOTH
            if not info.st_mode & bit:
                return False
    return True
