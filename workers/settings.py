"""Typed, frozen settings read once from the environment.

Every variable is prefixed ``STATESWEEP_``. Where Airflow already has a setting for the same
thing (retention, batch size, the metadata database URL, the state backend) Airflow's own
configuration is honoured when the statesweep one is unset, with Airflow's precedence
(workers.airflow_config), so statesweep can sit beside an Airflow deployment unconfigured.
Each setting remembers where it came from (``Settings.sources``) for `doctor` and errors.

Invalid values are collected and raised as one :class:`SettingsError` naming every variable and
its value, with passwords masked. An unknown ``STATESWEEP_*`` variable is an error too (a typo
must not silently fall back to a default). Nothing is deleted before settings load.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from workers import airflow_config
from workers.exceptions import SettingsError
from workers.masking import mask_secrets, mask_url

__all__ = ["Settings", "SettingsError", "get_settings", "mask_secrets", "mask_url"]

PREFIX = "STATESWEEP_"
METASTORE_BACKEND = "workers.store.MetastoreStateBackend"
NAMINGS = ("auto", "seed", "airflow")
LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Airflow's own variables for the settings statesweep shares with it (airflow_config reads
# them, their _CMD forms and airflow.cfg).
AIRFLOW_FALLBACKS = {
    f.upper(): airflow_config.env_name(section, key)
    for f, (section, key) in airflow_config.AIRFLOW_KEYS.items()
}
# STATESWEEP_* variables that are not settings: the test suite's service overrides, the
# benchmark's, and the reliability suite's report path.
NON_SETTING_PATTERNS = (re.compile(r"STATESWEEP_TEST_\w+"), re.compile(r"STATESWEEP_BENCH_\w+"),
                        re.compile(r"STATESWEEP_RELIABILITY_REPORT"))
DEFAULT_SOURCE = "default"

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
    # Chunks per second/minute/hour ("20/s", "600/m") all workers together may start; empty
    # means no limit. Trades cleanup speed for CPU and I/O left to the writers.
    chunk_rate_limit: str = ""
    # Flow control (workers/window.py): the planner, the in-flight window, and what holds it.
    planner: str = "auto"
    max_chunks_in_flight: int = 16
    active_hours: str = ""
    max_run_seconds: float = 0.0
    max_replica_lag_seconds: float = 0.0
    target_chunk_seconds: float = 0.0
    # 5 s: a killed worker's chunk (its heartbeat lapses in 6 s) is sent again within ~11 s.
    pump_interval_seconds: float = 5.0
    # MySQL/MariaDB replicas whose lag holds chunks (comma-separated URLs); PostgreSQL reads
    # its standbys' lag on the primary and needs none.
    replica_urls: str = ""
    # Task events for chunk tasks, so Flower lists each chunk; off saves three event publishes
    # per chunk in the worker (run progress stays in the run store, `status` and the exporter).
    chunk_task_events: bool = True
    # Expired state of a dag run that is queued or running is kept until the run finishes
    # (retries share their task's state; Airflow's own cleanup deletes it anyway). Needs
    # Airflow's dag_run.state; statesweep's standalone schema has no such column.
    protect_unfinished_dag_runs: bool = True
    # Beat's runs only (its coordinator entry's kwargs; ad-hoc runs take their own options):
    # the dag ids to clean, those to leave alone (comma-separated, as `airflow db clean`
    # spells them), and a grace period, a duration (600, 90s, 30m, 6h, 2d, 1w): each beat run
    # cleans state expired before the database's now() minus it.
    dag_ids: str = ""
    exclude_dag_ids: str = ""
    clean_grace: float = 0.0
    # Beat's db-clean (`airflow db clean` on the workers, workers.dbclean): off at 0; N > 0
    # cleans Airflow's metadata tables (STATESWEEP_DB_CLEAN_TABLES, empty = all) of rows older
    # than the database's now() minus N days, every STATESWEEP_DB_CLEAN_SCHEDULE.
    db_clean_keep_days: float = 0.0
    db_clean_tables: str = ""
    db_clean_schedule: str = "86400"
    # The orphan sweep's own soft limit (its hard limit is 30 s more): batches commit on their
    # own, so a sweep cut short keeps its progress and the next one goes on.
    orphan_soft_time_limit: int = 600
    log_format: str = "console"
    log_level: str = "INFO"
    # statesweep exporter: how long a backlog query's result (and the workers' ping) is reused,
    # and the statement timeout of each backlog query; scrapes never load the database more.
    exporter_cache_seconds: int = 60
    exporter_query_timeout_ms: int = 5000
    # "exact" (count(*) over the expires_at index) or "estimate" (the planner's row estimate on
    # PostgreSQL: microseconds at any size, as fresh as the table's last ANALYZE).
    exporter_backlog_count: str = "exact"
    # Where each setting came from (a variable, an airflow.cfg key, "default"); not a setting.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False,
                                       metadata={"setting": False})
    # What was configured where it differs from the value used (Airflow's metastore backend
    # names, which statesweep cleans as its own); `doctor` shows both. Not a setting.
    configured: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False,
                                          metadata={"setting": False})
    # Airflow values statesweep deliberately does not adopt (its shipped batch size 0, a result
    # backend it cannot use), as "where=value" (URLs masked), for `doctor`. Not a setting.
    not_adopted: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False,
                                           metadata={"setting": False})

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        errors = unknown_variables(env)
        try:
            airflow = airflow_config.AirflowConfig(env)
        except SettingsError as exc:  # a named airflow.cfg that is missing or unreadable
            errors.append(str(exc))
            airflow = airflow_config.AirflowConfig({})
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        configured: dict[str, str] = {}
        not_adopted: dict[str, str] = {}
        for f in setting_fields():
            name = PREFIX + f.name.upper()
            try:
                found = (airflow_config.Found(env[name], name) if name in env
                         else airflow.lookup(*airflow_config.AIRFLOW_KEYS[f.name])
                         if f.name in airflow_config.AIRFLOW_KEYS else None)
            except SettingsError as exc:  # a _cmd that failed: named, its output never shown
                errors.append(str(exc))
                continue
            if found is None:
                sources[f.name] = DEFAULT_SOURCE
                continue
            raw = found.raw
            if f.name == "cleanup_batch_size" and name not in env and is_zero(raw):
                # Airflow ships state_cleanup_batch_size = 0 ("no batching") in every generated
                # airflow.cfg: its default, not a choice. statesweep exists to batch; one
                # unbounded transaction is only ever an explicit STATESWEEP_CLEANUP_BATCH_SIZE=0.
                sources[f.name] = f"{DEFAULT_SOURCE} ({found.source}=0 means no batching in " \
                                  "Airflow; statesweep batches)"
                not_adopted[f.name] = f"{found.source}={raw.strip()}"
                continue
            schemes = airflow_config.ADOPTED_SCHEMES.get(f.name)
            if schemes and name not in env and raw.partition(":")[0].lower() not in schemes:
                not_adopted[f.name] = f"{found.source}={mask_url(raw)}"
                sources[f.name] = (f"{DEFAULT_SOURCE} ({found.source} is a "
                                   f"{raw.partition(':')[0] or 'non-URL'} backend; statesweep "
                                   f"takes {'/'.join(schemes[:2])} from Airflow's [celery])")
                continue
            sources[f.name] = found.source
            if f.name == "state_backend" and airflow_config.is_metastore(raw):
                if raw.strip() != METASTORE_BACKEND:
                    configured[f.name] = raw.strip()
                raw = METASTORE_BACKEND  # Airflow's name for the tables statesweep cleans
            try:
                values[f.name] = _PARSERS.get(f.name, _parse_str)(raw)
            except ValueError as exc:
                errors.append(f"{found.source}={_show(f.name, raw)!r}: {exc}")
        raise_errors(errors)
        settings = cls(**values, sources=sources, configured=configured,
                       not_adopted=not_adopted)
        settings.check()
        return settings

    @property
    def database_origin(self) -> str:
        """The database URL, masked, and where it came from: for every database error."""
        where, url = self.source_of("database_url"), mask_url(self.database_url)
        if where == DEFAULT_SOURCE:
            return (f"{url} (the default: no STATESWEEP_DATABASE_URL or Airflow "
                    "sql_alchemy_conn is set)")
        if where.startswith("airflow.cfg"):
            return f"{url} (from {where})"
        return f"{where}={url}"

    def source_of(self, name: str) -> str:
        """Where setting *name* came from: a variable, ``airflow.cfg PATH [section] key``, or
        ``default``; statesweep's own variable when the settings were built directly."""
        return self.sources.get(name, PREFIX + name.upper())

    def check(self) -> None:
        """Cross-field and import checks; raises one SettingsError listing every problem."""
        errors: list[str] = []

        def bad(name: str, msg: str) -> None:
            value = _show(name, str(getattr(self, name)))
            where = self.source_of(name)
            if where == DEFAULT_SOURCE:
                errors.append(f"{PREFIX}{name.upper()}={value!r} (the default): {msg}")
            else:
                errors.append(f"{where}={value!r}: {msg}")

        for name, ok in (("table_naming", NAMINGS), ("log_format", LOG_FORMATS),
                         ("log_level", LOG_LEVELS)):
            if getattr(self, name) not in ok:
                bad(name, f"must be one of {', '.join(ok)}")
        for name in ("control_queue", "chunk_queue"):
            if not re.fullmatch(r"[\w.:-]+", getattr(self, name)):
                bad(name, "must be a non-empty name of letters, digits, '.', ':', '_' or '-'")
        if not KEY_PREFIX.fullmatch(self.key_prefix):
            bad("key_prefix", "must be a non-empty name of letters, digits, '.', ':', '_' or "
                "'-', with at most one Redis Cluster hash tag in braces (e.g. {statesweep})")
        if self.control_queue == self.chunk_queue:
            bad("chunk_queue", "must differ from STATESWEEP_CONTROL_QUEUE")
        if self.chunk_soft_time_limit >= self.chunk_time_limit:
            bad("chunk_soft_time_limit", "must be below STATESWEEP_CHUNK_TIME_LIMIT")
        # A message not acknowledged within the visibility timeout is redelivered to another
        # worker while the first may still be running it; keep it well above the hard limit.
        if self.visibility_timeout < 2 * self.chunk_time_limit:
            bad("visibility_timeout", "must be at least twice STATESWEEP_CHUNK_TIME_LIMIT")
        # A coordinator delivery runs at most the lock TTL (its hard time limit) and its
        # planning lock and claim lapse with it. Redis redelivers the unacknowledged message
        # after the visibility timeout: sooner, and a second copy plans while the first still
        # may, or finds a dead copy's claim still standing. RabbitMQ redelivers only when the
        # consumer's connection is gone, so the rule is Redis's.
        if self.lock_ttl_seconds >= self.visibility_timeout \
                and not is_amqp_url(self.broker_url):
            bad("lock_ttl_seconds", f"must be below STATESWEEP_VISIBILITY_TIMEOUT="
                f"{self.visibility_timeout}: Redis would redeliver a coordinator to a second "
                "worker while the first may still hold the planning lock; lower the lock TTL "
                "or raise the visibility timeout")
        # A DELETE cut by the statement timeout rolls back in the database and the chunk is
        # retried (an OperationalError); one cut by the soft time limit is an exception raised
        # inside the driver's call, and the chunk fails for good.
        if self.statement_timeout_ms >= 1000 * self.chunk_soft_time_limit:
            bad("statement_timeout_ms", f"must be below STATESWEEP_CHUNK_SOFT_TIME_LIMIT="
                f"{self.chunk_soft_time_limit} s ({1000 * self.chunk_soft_time_limit} ms), so "
                "a slow DELETE is cancelled by the database, not cut off by the time limit")
        for name in ("lock_ttl_seconds", "run_timeout_seconds", "chunk_time_limit",
                     "chunk_soft_time_limit", "lock_timeout_ms", "statement_timeout_ms"):
            if getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        # The coordinator's soft time limit is 30 s under the run timeout, and a planned run
        # must outlive the planning lock; below a minute either would cut runs short.
        if self.run_timeout_seconds < max(60, self.lock_ttl_seconds):
            bad("run_timeout_seconds",
                "must be at least 60 and at least STATESWEEP_LOCK_TTL_SECONDS")
        if self.chunk_rate_limit and (
                not re.fullmatch(r"\d+(\.\d+)?/[smh]", self.chunk_rate_limit)
                or float(self.chunk_rate_limit.partition("/")[0]) <= 0):
            bad("chunk_rate_limit", "must be a positive rate like 20/s, 600/m or 1000/h")
        # A chunk waits for its rate-limit slot inside its task: with a full window waiting,
        # the last waits window/rate seconds, which must stay well inside the soft time limit.
        if self.chunk_rate_limit and re.fullmatch(r"\d+(\.\d+)?/[smh]", self.chunk_rate_limit) \
                and float(self.chunk_rate_limit.partition("/")[0]) > 0 \
                and self.max_chunks_in_flight / self.chunk_rate_per_second \
                > self.chunk_soft_time_limit / 2:
            bad("chunk_rate_limit", f"with STATESWEEP_MAX_CHUNKS_IN_FLIGHT="
                f"{self.max_chunks_in_flight} a chunk could wait "
                f"{self.max_chunks_in_flight / self.chunk_rate_per_second:.0f} s for its slot, "
                f"past half the {self.chunk_soft_time_limit} s soft time limit; raise the rate, "
                "lower the window or raise STATESWEEP_CHUNK_SOFT_TIME_LIMIT")
        if self.planner not in PLANNER_CHOICES:
            bad("planner", f"must be one of {', '.join(PLANNER_CHOICES)}")
        if self.max_chunks_in_flight < 1:
            bad("max_chunks_in_flight", "must be at least 1")
        backend = urlsplit(self.database_url).scheme.split("+")[0]
        if self.max_replica_lag_seconds and backend in ("mysql", "mariadb") \
                and not self.replica_url_list:
            bad("max_replica_lag_seconds", "on MySQL/MariaDB needs STATESWEEP_REPLICA_URLS "
                "(the replicas to read Seconds_Behind_Source from)")
        if self.max_replica_lag_seconds and backend == "sqlite":
            bad("max_replica_lag_seconds", "SQLite has no replicas")
        for url in self.replica_url_list:
            if urlsplit(url).scheme.split("+")[0] not in ("mysql", "mariadb"):
                errors.append(f"{PREFIX}REPLICA_URLS={mask_url(url)!r}: each must be a "
                              "mysql:// or mariadb:// URL of a replica")
        from workers.selection import MAX_GRACE_SECONDS, parse_dag_ids

        for name in ("dag_ids", "exclude_dag_ids"):
            try:
                parse_dag_ids(getattr(self, name))
            except ValueError as exc:
                bad(name, str(exc))
        if not 0 <= self.clean_grace <= MAX_GRACE_SECONDS:
            bad("clean_grace", f"must be a duration from 0 to ten years ({MAX_GRACE_SECONDS} s)")
        both = sorted(set(self.dag_id_list) & set(self.exclude_dag_id_list))
        if both:
            bad("exclude_dag_ids", f"excludes dag ids STATESWEEP_DAG_IDS names ({', '.join(both)})"
                "; a beat run would clean nothing of them")
        if self.active_hours:
            try:
                parse_active_hours(self.active_hours)
            except ValueError as exc:
                bad("active_hours", str(exc))
        if self.run_store_url and urlsplit(self.run_store_url).scheme not in RUN_STORE_SCHEMES:
            bad("run_store_url", "must be a redis://, rediss://, unix:// (a Redis socket) or "
                "memory:// URL")
        if not 0 <= self.db_clean_keep_days <= 3650:
            bad("db_clean_keep_days", "must be a number of days from 0 (off) to 3650")
        for name in ("coordinator_schedule", "orphan_schedule", "db_clean_schedule"):
            try:
                parse_schedule(getattr(self, name))
            except ValueError as exc:
                bad(name, str(exc))
        if self.airflow_custom_backend:
            pass  # Airflow's class lives in Airflow's environment; runs skip, importing nothing
        elif self.state_backend == METASTORE_BACKEND:
            pass  # statesweep's own (test_cli_imports holds it); importing it costs SQLAlchemy
        else:
            try:
                backend = import_string(self.state_backend)
            except ImportError as exc:
                bad("state_backend", f"cannot be imported ({exc})")
            else:
                if not isinstance(backend, type) or not callable(getattr(backend, "cleanup",
                                                                         None)):
                    bad("state_backend", "must name a class with a cleanup() method")
        raise_errors(errors)

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
    def chunk_rate_per_second(self) -> float:
        """STATESWEEP_CHUNK_RATE_LIMIT as chunks per second; 0 = no limit."""
        if not self.chunk_rate_limit:
            return 0.0
        count, _, unit = self.chunk_rate_limit.partition("/")
        return float(count) / {"s": 1, "m": 60, "h": 3600}[unit]

    @property
    def dag_id_list(self) -> list[str]:
        return [d for d in self.dag_ids.split(",") if d]

    @property
    def exclude_dag_id_list(self) -> list[str]:
        return [d for d in self.exclude_dag_ids.split(",") if d]

    @property
    def replica_url_list(self) -> list[str]:
        return [u.strip() for u in self.replica_urls.split(",") if u.strip()]

    @property
    def active_hours_window(self) -> Any:
        """The parsed STATESWEEP_ACTIVE_HOURS, or None when cleanup may run at any hour."""
        return parse_active_hours(self.active_hours) if self.active_hours else None

    @property
    def uses_metastore_backend(self) -> bool:
        return self.state_backend == METASTORE_BACKEND

    @property
    def airflow_custom_backend(self) -> bool:
        """Airflow's configuration names a state backend other than its metastore: the state
        lives elsewhere, so runs skip (as upstream's cleanup does) and delete nothing here.
        STATESWEEP_STATE_BACKEND, when set, wins and keeps its meaning (a class to call)."""
        where = self.source_of("state_backend")
        return not self.uses_metastore_backend and where.startswith(("AIRFLOW__", "airflow.cfg"))

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with every password masked; the only form fit for printing."""
        out: dict[str, Any] = {}
        for f in setting_fields():
            value = getattr(self, f.name)
            out[f.name] = mask_url(value) if f.name in _URL_FIELDS else value
        out["effective_run_store_url"] = mask_url(self.effective_run_store_url)
        return out

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.masked().items())
        return f"Settings({inner})"

    __str__ = __repr__


# --- parsing helpers ----------------------------------------------------------------------------

_URL_FIELDS = {"database_url", "broker_url", "result_backend", "run_store_url", "replica_urls"}


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
    """Any spelling Airflow accepts for the drivers statesweep serves (see db.normalise_url);
    kept as written, so `doctor` shows what the user set."""
    from workers.db_urls import check_database_url

    raw = _parse_str(raw)
    check_database_url(raw)  # ValueError naming what is wrong; never the URL itself
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


def _parse_positive_seconds(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive, finite number of seconds (unset it to turn off)")
    return value


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _parse_positive_int(raw: str) -> int:
    value = _parse_non_negative_int(raw)
    if value == 0:
        raise ValueError("must be at least 1")
    return value


def _parse_days(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("must be a number of days") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a number of days from 0 (off) to 3650")
    return value


def _parse_table_names(raw: str) -> str:
    """Comma-separated table names (db-clean's --tables); empty for all."""
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if raw.strip() and not names:
        raise ValueError("must name tables (comma-separated)")
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", n)]
    if bad:
        raise ValueError(f"is not a table name: {bad[0]!r}")
    return ",".join(names)


def _parse_dag_ids(raw: str) -> str:
    """Comma-separated dag ids, each once, spaces dropped; empty for none."""
    from workers.selection import parse_dag_ids

    return ",".join(parse_dag_ids(raw))


def _parse_duration(raw: str) -> float:
    """Seconds, or a number with a unit (90s, 30m, 6h, 2d, 1w); empty or 0 for none."""
    from workers.selection import parse_duration

    return parse_duration(raw) if raw.strip() else 0.0


def parse_active_hours(text: str) -> Any:
    from workers.flow.hours import parse_active_hours as parse

    return parse(text)


PLANNER_CHOICES = ("auto", "blocks", "ids", "walk", "expiry")
#: The largest batch: a chunk's row bound is a LIMIT/OFFSET the databases take as a 32-bit
#: integer, and a million rows in one transaction is already far past a short one.
MAX_BATCH_SIZE = 10_000_000


BATCH_SIZE_RULE = f"must be 0 (one chunk) or a number of rows up to {MAX_BATCH_SIZE:,}"


def check_batch_size_value(value: int, name: str = "--batch-size") -> int:
    """*value* if it is a batch size statesweep can run; else one ValueError naming *name* and
    the value. The one bound for settings, the CLI's --batch-size and task arguments."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BATCH_SIZE:
        raise ValueError(f"{name} {BATCH_SIZE_RULE}, got {value!r}")
    return value


def _parse_batch_size(raw: str) -> int:
    value = _parse_non_negative_int(raw)
    if value > MAX_BATCH_SIZE:
        raise ValueError(BATCH_SIZE_RULE)
    return value


def is_zero(raw: str) -> bool:
    """Whether a batch size as written is 0 in any spelling ("0", "00", "+0", " 0 ")."""
    try:
        return int(raw.strip()) == 0
    except ValueError:
        return False


_PARSERS = {
    "planner": _parse_lower,
    "max_chunks_in_flight": _parse_positive_int,
    "max_run_seconds": _parse_positive_seconds,
    "max_replica_lag_seconds": _parse_positive_seconds,
    "target_chunk_seconds": _parse_positive_seconds,
    "pump_interval_seconds": _parse_positive_seconds,
    "orphan_soft_time_limit": _parse_positive_int,
    "chunk_task_events": _parse_bool,
    "protect_unfinished_dag_runs": _parse_bool,
    "dag_ids": _parse_dag_ids,
    "exclude_dag_ids": _parse_dag_ids,
    "clean_grace": _parse_duration,
    "db_clean_keep_days": _parse_days,
    "db_clean_tables": _parse_table_names,
    "database_url": _parse_database_url,
    "broker_url": _parse_broker_url,
    "result_backend": _parse_broker_url,
    "run_store_url": _parse_run_store_url,
    "default_retention_days": _parse_non_negative_int,
    "cleanup_batch_size": _parse_batch_size,
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
    "exporter_cache_seconds": _parse_non_negative_int,
    "exporter_query_timeout_ms": _parse_non_negative_int,
    "exporter_backlog_count": _parse_lower,
}

def setting_fields() -> tuple[Field[Any], ...]:
    """The dataclass fields that are settings (each read from ``STATESWEEP_<NAME>``)."""
    return tuple(f for f in fields(Settings) if f.metadata.get("setting", True))


#: Every environment variable the settings read; docker-compose and docs are checked against it.
ENV_VARS = tuple(PREFIX + f.name.upper() for f in setting_fields()) + tuple(
    AIRFLOW_FALLBACKS.values()
)


def raise_errors(errors: list[str]) -> None:
    """One SettingsError: one line for one problem, a list for several."""
    if len(errors) == 1:
        raise SettingsError(f"invalid setting {errors[0]}")
    if errors:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(errors))


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """An error for each STATESWEEP_* variable that is no setting, with the closest name."""
    known = [PREFIX + f.name.upper() for f in setting_fields()]
    errors = []
    for name in sorted(n for n in env if n.startswith(PREFIX) and n not in known):
        if any(p.fullmatch(name) for p in NON_SETTING_PATTERNS):
            continue
        # Compared without the prefix every name shares, which would make all names "close".
        suffix, suffixes = name[len(PREFIX):], [k[len(PREFIX):] for k in known]
        close = difflib.get_close_matches(suffix, suffixes, n=1, cutoff=0.6)
        hint = f"; did you mean {PREFIX}{close[0]}?" if close else ""
        errors.append(f"{name}: is not a statesweep setting{hint}")
    return errors


MAX_SCHEDULE_SECONDS = 366 * 24 * 3600


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
    # nan and inf parse as floats; beat would crash on them (OverflowError) long after start-up.
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("must be a positive, finite number of seconds")
    if seconds > MAX_SCHEDULE_SECONDS:
        raise ValueError(f"must be at most {MAX_SCHEDULE_SECONDS} seconds (a year); "
                         "use a crontab for rarer runs")
    return seconds


def is_redis(url: str) -> bool:
    return urlsplit(url).scheme in ("redis", "rediss")


def is_redis_store(url: str) -> bool:
    """Whether a run store URL is a Redis that processes share (TCP, TLS or a unix socket),
    not one process's memory://."""
    return urlsplit(url).scheme in ("redis", "rediss", "unix")


#: Run store URLs: Redis over TCP or TLS, Redis on a unix socket (redis-py's
#: ``unix:///path/redis.sock?db=0``), or one process's memory.
RUN_STORE_SCHEMES = ("redis", "rediss", "unix", "memory")

#: A run store key prefix: a name, with at most one Redis Cluster hash tag (``{...}``) in it.
#: Redis Cluster hashes only the tag of a key that has one, so every key statesweep makes
#: lands in one slot, as the run scripts (several keys each) need there.
KEY_PREFIX = re.compile(r"(?=.)[\w.:-]*(\{[\w.:-]+\})?[\w.:-]*")


def is_amqp_url(url: str) -> bool:
    """Whether *url* (the first of a ``;``-separated failover list) is a RabbitMQ broker."""
    return urlsplit(url.split(";", 1)[0].strip()).scheme in ("amqp", "amqps", "pyamqp")


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
