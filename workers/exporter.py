"""`statesweep exporter`: Prometheus metrics that answer "is cleanup keeping up?".

Read at scrape time, never pushed: the counters every worker adds to in the run store
(workers.metrics), the last runs from the same store, the backlog from the database and the
workers that answer Celery's inspect. The backlog queries and the inspect broadcast are cached
for STATESWEEP_EXPORTER_CACHE_SECONDS and each query is bounded by
STATESWEEP_EXPORTER_QUERY_TIMEOUT_MS, so a scrape every 15 s costs the database one round of
indexed queries a minute. A part that fails is ``statesweep_up{part=...} 0`` and a log line;
the exporter keeps serving the parts that work.
"""

from __future__ import annotations

import datetime as dt
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, Select, Table, func, literal_column, select

from workers import metrics
from workers.exceptions import RefusedError, SettingsError
from workers.runs import RunRecord, registry_for
from workers.settings import Settings, is_redis_store, mask_url, parse_schedule

log = structlog.get_logger("statesweep.exporter")

DEFAULT_PORT = metrics.EXPORTER_PORT
PARTS = ("run_store", "database", "workers")
RUN_STATES = ("planning", "running", "finished", "failed")
BACKLOG_COUNTS = ("exact", "estimate")
RECENT_RUNS = 50  # how far back to look for the last finished run
CONTROL_TIMEOUT = 1.5  # seconds workers get to answer an inspect
CONNECT_TIMEOUT = 3

T = TypeVar("T")


class TimedCache(Generic[T]):
    """The last outcome of *refresh* (its value or its error) for *ttl* seconds; one refresh
    at a time, however many scrapes arrive together."""

    def __init__(self, ttl: float, refresh: Callable[[], T],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.refresh, self.clock = ttl, refresh, clock
        self._lock = threading.Lock()
        self._at: float | None = None
        self._value: T | None = None
        self._error: BaseException | None = None

    def get(self) -> T:
        with self._lock:
            if self._at is None or self.clock() - self._at >= self.ttl:
                try:
                    self._value, self._error = self.refresh(), None
                except Exception as exc:
                    self._value, self._error = None, exc
                self._at = self.clock()
            if self._error is not None:
                raise self._error
            return self._value  # type: ignore[return-value]


@dataclass(frozen=True)
class Backlog:
    task_table: str
    expired_rows: int
    oldest_expired_age_seconds: float
    asset_table: str
    orphaned_rows: int
    # Expired rows kept because their dag run is queued or running, and the oldest one's age.
    protected_rows: int = 0
    protected_oldest_age_seconds: float = 0.0


def read_backlog(engine: Engine, naming: str, timeout_ms: int,
                 count: str = "exact", protect: bool = True) -> Backlog:
    """The three backlog numbers in one short transaction, each statement bounded by
    *timeout_ms*. The count and the min() are served by the expires_at index; the orphan count
    is an anti-join over asset state, which is small next to task state. *count* "estimate"
    takes the planner's estimate instead of counting (PostgreSQL; elsewhere it counts)."""
    from workers.cleanup import Protected, count_orphaned_asset_state, count_protected
    from workers.db import db_now, set_timeouts
    from workers.schema import resolve_tables

    with engine.begin() as conn:
        set_timeouts(conn, timeout_ms, timeout_ms)
        # Inside the bounded transaction: inspecting a table someone holds locked waits too.
        tables = resolve_tables(conn, naming)
        t = tables.task_state
        now = db_now(conn)
        # min() first: one index probe, exact, and when it finds nothing the count is 0 (the
        # planner never estimates below 1 row).
        oldest = conn.execute(
            select(func.min(t.c.expires_at)).where(t.c.expires_at < now)).scalar_one_or_none()
        if oldest is None:
            expired = 0
        elif count == "estimate" and conn.dialect.name == "postgresql":
            expired = estimate_expired(conn, t)
        else:
            expired = conn.execute(
                select(func.count()).select_from(t).where(t.c.expires_at < now)).scalar_one()
        orphaned = count_orphaned_asset_state(conn, tables)
        protected = (count_protected(conn, tables, now) if protect and oldest is not None
                     else Protected(0, None))
    return Backlog(t.name, int(expired), _age(now, oldest), tables.asset_state.name,
                   int(orphaned), protected.rows, _age(now, protected.oldest))


def _age(now: dt.datetime, then: dt.datetime | None) -> float:
    if then is None:
        return 0.0
    then = then if then.tzinfo else then.replace(tzinfo=dt.UTC)
    return max(0.0, (now - then).total_seconds())


def estimate_expired(conn: Connection, t: Table) -> int:
    """The planner's estimate of rows with expires_at < now(), from the table's statistics;
    now() is stable, so the planner evaluates it when it estimates. Nothing is read."""
    stmt: Select[Any] = (select(literal_column("1")).select_from(t)
                         .where(t.c.expires_at < func.now()))
    sql = str(stmt.compile(dialect=conn.dialect))
    plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql).scalar_one()[0]["Plan"]
    return max(0, int(plan["Plan Rows"]))


def schedule_seconds(raw: str) -> float | None:
    """The coordinator's period in seconds; None for a crontab (no fixed period)."""
    parsed = parse_schedule(raw)
    return parsed if isinstance(parsed, float) else None


class StatesweepCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        from workers.db import make_engine

        self.settings = settings
        self.registry = registry_for(settings.effective_run_store_url, settings.key_prefix)
        url = settings.database_url
        self.engine = make_engine(url, **(
            {} if url.startswith("sqlite") else {"connect_args": {"connect_timeout":
                                                                  CONNECT_TIMEOUT}}))
        ttl = settings.exporter_cache_seconds
        self.backlog = TimedCache(ttl, lambda: read_backlog(
            self.engine, settings.table_naming, settings.exporter_query_timeout_ms,
            settings.exporter_backlog_count, settings.protect_unfinished_dag_runs))
        self.consumers = TimedCache(ttl, self._read_consumers)
        self._app: Any = None

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on what answers; describe nothing, collect at scrape time

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("statesweep_up", "1 if this part answered the last scrape, "
                               "0 if it failed (the exporter logs why)", labels=["part"])
        for part, read in (("run_store", self._run_store), ("database", self._database),
                           ("workers", self._workers)):
            try:
                families = list(read())  # all of a part, or none of it
            except Exception as exc:
                reason = getattr(exc, "orig", None) or exc
                log.warning("exporter_part_failed", part=part, error=(
                    f"{type(reason).__name__}: {str(reason).strip().splitlines()[:1]}"))
                up.add_metric([part], 0)
                continue
            up.add_metric([part], 1)
            yield from families
        yield up

    # --- run store: counters, runs, lock -------------------------------------------------------

    def _run_store(self) -> Iterator[Metric]:
        c = metrics.read_counters(self.registry.client, self.registry.prefix)
        rows = CounterMetricFamily("statesweep_rows_deleted", "Rows deleted, by table (expired "
                                   "task state and orphaned asset state)", labels=["table"])
        for table, n in sorted(c.rows_deleted.items()):
            rows.add_metric([table], n)
        yield rows
        for name, value, doc in (
            ("chunks_done", c.chunks_done, "Chunks deleted and counted (once each)"),
            ("chunks_failed", c.chunks_failed, "Chunks that failed for good"),
            ("chunks_retried", c.chunks_retried, "Retries of chunk tasks"),
        ):
            yield CounterMetricFamily(f"statesweep_{name}", doc, value=value)
        moved = CounterMetricFamily("statesweep_db_clean_rows_deleted", "Rows db-clean moved "
                                    "(archived unless --skip-archive, and deleted), by table",
                                    labels=["table"])
        for table, n in sorted(c.db_clean_rows_deleted.items()):
            moved.add_metric([table], n)
        yield moved
        for name, value, doc in (
            ("db_clean_chunks_done", c.db_clean_chunks_done,
             "db-clean chunks moved and counted (once each)"),
            ("db_clean_chunks_failed", c.db_clean_chunks_failed,
             "db-clean chunks that failed for good (their table is reported failed)"),
        ):
            yield CounterMetricFamily(f"statesweep_{name}", doc, value=value)
        yield HistogramMetricFamily(
            "statesweep_chunk_duration_seconds", "Time a chunk's DELETE took",
            buckets=c.chunk_seconds_buckets, sum_value=c.chunk_seconds_sum)
        yield from self._runs()

    def _runs(self) -> Iterator[Metric]:
        active = self.registry.active_run()
        yield GaugeMetricFamily("statesweep_run_active", "1 while a run holds the single-flight "
                                "lock", value=1 if active else 0)
        yield GaugeMetricFamily("statesweep_paused", "1 while cleanup is paused",
                                value=1 if self.registry.paused() is not None else 0)
        period = schedule_seconds(self.settings.coordinator_schedule)
        if period is not None:
            yield GaugeMetricFamily("statesweep_coordinator_schedule_seconds",
                                    "Period of the coordinator's beat trigger", value=period)
        recent = self.registry.recent(RECENT_RUNS)
        if recent:
            yield from _last_run(recent[0])
        finished = next((r for r in recent if r.state == "finished" and r.finished_at), None)
        if finished is not None:
            yield GaugeMetricFamily("statesweep_last_finished_run_timestamp_seconds",
                                    "When the last run that finished cleanly ended",
                                    value=finished.finished_at)

    # --- database: the backlog -----------------------------------------------------------------

    def _database(self) -> Iterator[Metric]:
        b = self.backlog.get()
        for name, table, value, doc in (
            ("expired_rows", b.task_table, b.expired_rows,
             "Task state rows past expires_at and not yet deleted"),
            ("oldest_expired_age_seconds", b.task_table, b.oldest_expired_age_seconds,
             "Age of the oldest expired task state row (0 when none)"),
            ("orphaned_rows", b.asset_table, b.orphaned_rows,
             "Asset state rows of inactive assets"),
            ("protected_rows", b.task_table, b.protected_rows,
             "Expired task state rows kept because their dag run is queued or running"),
            ("protected_oldest_age_seconds", b.task_table, b.protected_oldest_age_seconds,
             "How long ago the oldest protected row expired (0 when none): a dag run stuck "
             "in queued or running"),
        ):
            g = GaugeMetricFamily(f"statesweep_backlog_{name}", doc, labels=["table"])
            g.add_metric([table], value)
            yield g

    # --- workers -------------------------------------------------------------------------------

    def _read_consumers(self) -> dict[tuple[str, str], int]:
        """(role, queue name) -> workers consuming it; the role lets alert rules name the chunk
        queue without knowing its configured name."""
        if self._app is None:
            self._app = _client_app(self.settings)
        answers = self._app.control.inspect(timeout=CONTROL_TIMEOUT).active_queues() or {}
        return {(role, q): sum(1 for qs in answers.values()
                               if any(x.get("name") == q for x in qs))
                for role, q in (("control", self.settings.control_queue),
                                ("chunks", self.settings.chunk_queue))}

    def _workers(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("statesweep_workers", "Workers that answered Celery's inspect, "
                              "by statesweep queue they consume", labels=["role", "queue"])
        for (role, queue), n in self.consumers.get().items():
            g.add_metric([role, queue], n)
        yield g


def _last_run(r: RunRecord) -> Iterator[Metric]:
    state = GaugeMetricFamily("statesweep_last_run_state", "1 for the newest run's state",
                              labels=["state"])
    for s in sorted({*RUN_STATES, r.state}):
        state.add_metric([s], 1 if s == r.state else 0)
    yield state
    for name, value, doc in (
        ("start_timestamp_seconds", r.started_at, "When the newest run started"),
        ("finish_timestamp_seconds", r.finished_at, "When it ended (0 while it runs)"),
        ("rows_deleted", r.rows_deleted, "Rows it deleted so far"),
        ("duration_seconds", r.duration, "How long it ran (so far)"),
    ):
        yield GaugeMetricFamily(f"statesweep_last_run_{name}", doc, value=value)


def _client_app(settings: Settings) -> Any:
    """A Celery client (no tasks) that gives up on a dead broker in seconds, not minutes."""
    from workers.celery_app import build_app

    app = build_app(settings, include_tasks=False)
    app.conf.update(broker_connection_timeout=CONNECT_TIMEOUT,
                    broker_connection_max_retries=1,
                    broker_transport_options={**app.conf.broker_transport_options,
                                              "socket_connect_timeout": CONNECT_TIMEOUT,
                                              "max_retries": 1})
    return app


def serve(settings: Settings, host: str, port: int,
          stop: threading.Event | None = None) -> None:
    """Serve /metrics on host:port until SIGTERM/SIGINT (or *stop* is set)."""
    if not is_redis_store(settings.effective_run_store_url):
        raise RefusedError(
            "the exporter reads the counters the workers keep in the run store, and memory:// "
            "is one process's memory; set STATESWEEP_RUN_STORE_URL (or "
            "STATESWEEP_RESULT_BACKEND) to the Redis the workers use")
    if settings.exporter_query_timeout_ms <= 0:
        raise SettingsError("invalid settings:\n  STATESWEEP_EXPORTER_QUERY_TIMEOUT_MS="
                            f"'{settings.exporter_query_timeout_ms}': must be a positive integer")
    if settings.exporter_backlog_count not in BACKLOG_COUNTS:
        raise SettingsError("invalid settings:\n  STATESWEEP_EXPORTER_BACKLOG_COUNT="
                            f"'{settings.exporter_backlog_count}': must be exact or estimate")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatesweepCollector(settings))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise RefusedError(f"cannot listen on {host}:{port} (--host/--port): "
                           f"{exc.strerror or exc}") from None
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    log.info("exporter_started", host=host, port=port, database=mask_url(settings.database_url),
             run_store=mask_url(settings.effective_run_store_url),
             cache_seconds=settings.exporter_cache_seconds)
    stop.wait()
    server.shutdown()
    log.info("exporter_stopped")
