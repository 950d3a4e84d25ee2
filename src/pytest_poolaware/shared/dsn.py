"""PostgreSQL DSNs: show them without their password, and rewrite their credentials.

Both URL (``postgresql://user:secret@host/db``) and key=value (``host=h password=p``) forms
are handled; psycopg is imported only for the key=value form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

#: What a password is shown as.
MASK: Final = "***"
#: The engine helper names its connections ``poolaware-<worker>`` so pg_stat_activity
#: shows who holds them (and the monitor can count them).
APPLICATION_NAME_PREFIX: Final = "poolaware-"


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


def mask_dsn(dsn: str) -> str:
    """The DSN with any password shown as ``***``; all of it masked when it cannot be parsed."""
    try:
        if "://" in dsn:
            parts = urlsplit(dsn)
            userinfo = parts.netloc.rpartition("@")[0]
            if parts.password is not None:
                userinfo = userinfo.partition(":")[0] + ":" + MASK
            return _url_with(dsn, userinfo, lambda key, value: MASK if key == "password" else value)
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(dsn)
        if "password" in params:
            params["password"] = MASK
        return make_conninfo("", **params)
    except Exception:
        return MASK


def with_credentials(dsn: str, user: str, password: str | None) -> str:
    """The same DSN for another user (and password, None: none), keeping its form."""
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
