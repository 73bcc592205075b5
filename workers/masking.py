"""Passwords out of URLs, for everything statesweep prints or logs.

A password can sit in three places of the URLs statesweep is given: the userinfo
(``redis://:pw@host``), a query option (``postgresql://u@h/db?password=pw``, which psycopg and
redis-py accept), and each URL of a ``;``-separated failover list (kombu's broker form).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_USERINFO_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)@")
# Query options that carry a secret: psycopg, PyMySQL and redis-py all take ?password=.
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&](?:password|passwd|pwd|sslpassword|secret|token)=)(?P<pw>[^&#\s]*)",
    re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"[a-zA-Z][\w+.-]*://[^\s'\"]+")


def mask_url(url: str) -> str:
    """Return *url* with every password replaced by ``***``; safe to print or log.

    Masks the userinfo password and secret query options (``?password=``), in each URL of a
    ``;``-separated failover list (as kombu takes for brokers). Works on URLs that fail to
    parse too, since a malformed URL still ends up in error messages.
    """
    if ";" in url:
        return ";".join(mask_url(part) for part in url.split(";"))
    masked = url
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.hostname or ""
            if parts.port is not None:
                host = f"{host}:{parts.port}"
            user = parts.username or ""
            masked = urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        pass
    # Also where urlsplit found no password: it reads no netloc behind a scheme it rejects
    # (SQLAlchemy's oracle+cx_oracle:// has an underscore).
    masked = _USERINFO_PASSWORD.sub(lambda m: f"{m.group('head')}***@", masked)
    return _QUERY_SECRET.sub(lambda m: f"{m.group('head')}***", masked)


def mask_secrets(text: str) -> str:
    """*text* with every URL in it masked, for messages that quote a URL (driver errors do)."""
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)
