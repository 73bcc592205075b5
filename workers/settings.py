"""Typed, frozen settings read once from the environment.

Every variable is prefixed ``STATESWEEP_``. Where Airflow already has a setting for the same
thing (retention, batch size, the metadata database URL) it is honoured when the statesweep one
is unset, so statesweep can sit beside an Airflow deployment with no extra configuration.

Invalid values are collected and raised as one :class:`SettingsError` naming every variable and
its value, with passwords masked. Nothing is deleted before settings load.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from workers.exceptions import SettingsError

PREFIX = "STATESWEEP_"
METASTORE_BACKEND = "workers.store.MetastoreStateBackend"
NAMINGS = ("auto", "seed", "airflow")
LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Airflow's own names for the settings statesweep shares with it.
AIRFLOW_FALLBACKS = {
    "DEFAULT_RETENTION_DAYS": "AIRFLOW__STATE_STORE__DEFAULT_RETENTION_DAYS",
    "CLEANUP_BATCH_SIZE": "AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE",
    "DATABASE_URL": "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
}

_USERINFO_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)@")


def mask_url(url: str) -> str:
    """Return *url* with any password replaced by ``***``; safe to print or log.

    Works on URLs that fail to parse too, since a malformed URL still ends up in error messages.
    """
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.hostname or ""
            if parts.port is not None:
                host = f"{host}:{parts.port}"
            user = parts.username or ""
            return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        pass
    return _USERINFO_PASSWORD.sub(lambda m: f"{m.group('head')}***@", url)


@dataclass(frozen=True)
class Settings:
    """Everything statesweep reads from the environment. Build with :meth:`from_env`."""

    database_url: str = "sqlite:///statesweep.db"
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/0"
    # Where runs and the single-flight lock live; empty means "the result backend's Redis".
    run_store_url: str = ""
    default_retention_days: int = 30
    cleanup_batch_size: int = 10000
    table_naming: str = "auto"
    state_backend: str = METASTORE_BACKEND
    coordinator_schedule: str = "600"
    orphan_schedule: str = "300"
    control_queue: str = "statesweep.control"
    chunk_queue: str = "statesweep.chunks"
    key_prefix: str = "statesweep"
    lock_ttl_seconds: int = 60
    run_timeout_seconds: int = 3600
    # Measured chunks take 10-40 ms (a cold first one ~140 ms); the limits leave room for lock
    # waits and a slow disk. The statement timeout stops a DELETE before the soft limit, and a
    # killed worker's chunk waits the visibility timeout on Redis (README: time limits).
    chunk_soft_time_limit: int = 25
    chunk_time_limit: int = 30
    visibility_timeout: int = 90
    lock_timeout_ms: int = 5000
    statement_timeout_ms: int = 20000
    # Chunks per second each worker may start ("20/s", "600/m"); empty means no limit. Trades
    # cleanup speed for CPU and I/O left to the writers on a busy database.
    chunk_rate_limit: str = ""
    log_format: str = "console"
    log_level: str = "INFO"

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        errors: list[str] = []
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = PREFIX + f.name.upper()
            source = name
            raw = env.get(name)
            if raw is None and f.name.upper() in AIRFLOW_FALLBACKS:
                source = AIRFLOW_FALLBACKS[f.name.upper()]
                raw = env.get(source)
            if raw is None:
                continue
            try:
                values[f.name] = _PARSERS.get(f.name, _parse_str)(raw)
            except ValueError as exc:
                errors.append(f"{source}={_show(f.name, raw)!r}: {exc}")
        if errors:
            raise SettingsError("invalid settings:\n  " + "\n  ".join(errors))
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Cross-field and import checks; raises one SettingsError listing every problem."""
        errors: list[str] = []

        def bad(field: str, msg: str) -> None:
            value = getattr(self, field)
            errors.append(f"{PREFIX}{field.upper()}={_show(field, str(value))!r}: {msg}")

        for field, ok in (("table_naming", NAMINGS), ("log_format", LOG_FORMATS),
                          ("log_level", LOG_LEVELS)):
            if getattr(self, field) not in ok:
                bad(field, f"must be one of {', '.join(ok)}")
        for field in ("control_queue", "chunk_queue", "key_prefix"):
            if not re.fullmatch(r"[\w.:-]+", getattr(self, field)):
                bad(field, "must be a non-empty name of letters, digits, '.', ':', '_' or '-'")
        if self.control_queue == self.chunk_queue:
            bad("chunk_queue", "must differ from STATESWEEP_CONTROL_QUEUE")
        if self.chunk_soft_time_limit >= self.chunk_time_limit:
            bad("chunk_soft_time_limit", "must be below STATESWEEP_CHUNK_TIME_LIMIT")
        # A message not acknowledged within the visibility timeout is redelivered to another
        # worker while the first may still be running it; keep it well above the hard limit.
        if self.visibility_timeout < 2 * self.chunk_time_limit:
            bad("visibility_timeout", "must be at least twice STATESWEEP_CHUNK_TIME_LIMIT")
        for field in ("lock_ttl_seconds", "run_timeout_seconds", "chunk_time_limit",
                      "chunk_soft_time_limit", "lock_timeout_ms", "statement_timeout_ms"):
            if getattr(self, field) <= 0:
                bad(field, "must be a positive integer")
        # The coordinator's soft time limit is 30 s under the run timeout, and a planned run
        # must outlive the planning lock; below a minute either would cut runs short.
        if self.run_timeout_seconds < max(60, self.lock_ttl_seconds):
            bad("run_timeout_seconds",
                "must be at least 60 and at least STATESWEEP_LOCK_TTL_SECONDS")
        if self.chunk_rate_limit and not re.fullmatch(r"\d+(\.\d+)?/[smh]",
                                                      self.chunk_rate_limit):
            bad("chunk_rate_limit", "must be a rate like 20/s, 600/m or 1000/h")
        if self.run_store_url and urlsplit(self.run_store_url).scheme not in (
            "redis", "rediss", "memory"
        ):
            bad("run_store_url", "must be a redis://, rediss:// or memory:// URL")
        for field in ("coordinator_schedule", "orphan_schedule"):
            try:
                parse_schedule(getattr(self, field))
            except ValueError as exc:
                bad(field, str(exc))
        try:
            backend = import_string(self.state_backend)
        except ImportError as exc:
            bad("state_backend", f"cannot be imported ({exc})")
        else:
            if not isinstance(backend, type) or not callable(getattr(backend, "cleanup", None)):
                bad("state_backend", "must name a class with a cleanup() method")
        if errors:
            raise SettingsError("invalid settings:\n  " + "\n  ".join(errors))

    # --- derived values -----------------------------------------------------------------------

    @property
    def effective_run_store_url(self) -> str:
        """Run records and the lock live in Redis; the in-memory store serves the demo only."""
        if self.run_store_url:
            return self.run_store_url
        for url in (self.result_backend, self.broker_url):
            if is_redis(url):
                return url
        return "memory://"

    @property
    def stall_after_seconds(self) -> int:
        """A planned run with no finished chunk for this long has lost a message: by then Redis
        has redelivered any chunk a worker took and died with, and any running chunk has hit
        its hard limit. The next trigger sends its missing chunks again."""
        return self.visibility_timeout + self.chunk_time_limit

    @property
    def uses_metastore_backend(self) -> bool:
        return self.state_backend == METASTORE_BACKEND

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with every password masked; the only form fit for printing."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = mask_url(value) if f.name in _URL_FIELDS else value
        out["effective_run_store_url"] = mask_url(self.effective_run_store_url)
        return out

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.masked().items())
        return f"Settings({inner})"

    __str__ = __repr__


# --- parsing helpers ----------------------------------------------------------------------------

_URL_FIELDS = {"database_url", "broker_url", "result_backend", "run_store_url"}


def _show(field: str, raw: str) -> str:
    return mask_url(raw) if field in _URL_FIELDS else raw


def _parse_str(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _parse_non_negative_int(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError("must be a whole number") from None
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _parse_database_url(raw: str) -> str:
    raw = _parse_str(raw)
    try:
        url = make_url(raw)
        url.port  # noqa: B018 - a malformed port raises here, not at connect time
    except (ArgumentError, ValueError):
        # The parser's own message repeats the whole URL, password included: never shown.
        raise ValueError(
            "is not a database URL (expected e.g. postgresql://user@host:5432/db)") from None
    if url.get_backend_name() not in ("postgresql", "sqlite", "mysql", "mariadb"):
        raise ValueError("must be a postgresql://, mysql://, mariadb:// or sqlite:// URL")
    return raw


def _parse_broker_url(raw: str) -> str:
    raw = _parse_str(raw)
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ValueError("is not a URL") from None
    if not parts.scheme or "://" not in raw:
        raise ValueError("is not a URL (expected e.g. redis://host:6379/0)")
    return raw


def _parse_run_store_url(raw: str) -> str:
    return _parse_broker_url(raw)


def _parse_upper(raw: str) -> str:
    return _parse_str(raw).upper()


def _parse_lower(raw: str) -> str:
    return _parse_str(raw).lower()


_PARSERS = {
    "database_url": _parse_database_url,
    "broker_url": _parse_broker_url,
    "result_backend": _parse_broker_url,
    "run_store_url": _parse_run_store_url,
    "default_retention_days": _parse_non_negative_int,
    "cleanup_batch_size": _parse_non_negative_int,
    "lock_ttl_seconds": _parse_non_negative_int,
    "run_timeout_seconds": _parse_non_negative_int,
    "chunk_soft_time_limit": _parse_non_negative_int,
    "chunk_time_limit": _parse_non_negative_int,
    "visibility_timeout": _parse_non_negative_int,
    "lock_timeout_ms": _parse_non_negative_int,
    "statement_timeout_ms": _parse_non_negative_int,
    "table_naming": _parse_lower,
    "log_format": _parse_lower,
    "log_level": _parse_upper,
}

#: Every environment variable the settings read; docker-compose and docs are checked against it.
ENV_VARS = tuple(PREFIX + f.name.upper() for f in fields(Settings)) + tuple(
    AIRFLOW_FALLBACKS.values()
)


def parse_schedule(raw: str) -> float | tuple[str, str, str, str, str]:
    """A schedule is seconds (``"600"``) or a five-field crontab (``"*/10 * * * *"``)."""
    text = raw.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = text.split()
        if len(parts) != 5:
            raise ValueError(
                "must be seconds (e.g. 600) or a five-field crontab (e.g. '*/10 * * * *')"
            ) from None
        from celery.schedules import crontab

        try:
            crontab(*parts)
        except ValueError as exc:
            raise ValueError(f"is not a valid crontab ({exc})") from None
        return (parts[0], parts[1], parts[2], parts[3], parts[4])
    if seconds <= 0:
        raise ValueError("must be a positive number of seconds")
    return seconds


def is_redis(url: str) -> bool:
    return urlsplit(url).scheme in ("redis", "rediss")


def import_string(path: str) -> Any:
    """Import ``package.module.Name``; raises ImportError with the reason."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"{path!r} is not a dotted path")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read once. Tests build their own with Settings.from_env(env)."""
    return Settings.from_env()
