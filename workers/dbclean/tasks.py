"""The db-clean Celery tasks: the coordinator, the chunk and the pump. Messaging, argument checks
and retries only; the work is in workers.dbclean.distributed.

    celery -A workers call statesweep.db_clean \
        --kwargs '{"clean_before_timestamp": "2026-06-01T00:00:00+00:00", "skip_archive": true}'
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import structlog
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError

from workers.celery_app import DB_CLEAN, DB_CLEAN_CHUNK, DB_CLEAN_PUMP, app, resources, settings
from workers.coordinator import batch_size_for, check_run_id
from workers.db import db_now
from workers.dbclean import distributed, run
from workers.exceptions import InvalidArgument
from workers.identity import DatabaseIdentity, other_database, read_identity
from workers.selection import _dag_ids, _timestamp

log = structlog.get_logger("statesweep.dbclean")

#: Longest keep_days a trigger may ask for (ten years).
MAX_KEEP_DAYS = 3650


def send_chunk(run_id: str, chunk: int, table: str, lo: str | None, hi: str | None) -> None:
    db_clean_chunk.apply_async(
        kwargs={"run_id": run_id, "chunk": chunk, "table": table, "lo": lo, "hi": hi},
        queue=settings.chunk_queue)


def send_pump(run_id: str) -> None:
    db_clean_pump.apply_async(kwargs={"run_id": run_id}, queue=settings.control_queue)


def context(*, in_chunk: bool = False) -> distributed.Context:
    r = resources()
    return distributed.Context(r.settings, r.engine, r.registry, send_chunk,
                               send_pump if in_chunk else None)


def _tables(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"tables must be comma-separated table names or a list of them, "
                              f"got {value!r}")
    return tuple(v.strip() for v in value if v.strip())


def _keep_days(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value <= MAX_KEEP_DAYS:
        raise InvalidArgument(f"keep_days must be a number of days above 0 and at most "
                              f"{MAX_KEEP_DAYS}, got {value!r}")
    return float(value)


def request_from_args(clean_before_timestamp: Any, keep_days: Any, tables: Any, dag_ids: Any,
                      exclude_dag_ids: Any, batch_size: Any, skip_archive: Any,
                      now: dt.datetime | None = None) -> run.Request:
    """A task's arguments as a run request; InvalidArgument names a bad one."""
    if (clean_before_timestamp in (None, "")) == (keep_days is None):
        raise InvalidArgument("give exactly one of clean_before_timestamp (ISO-8601) and "
                              "keep_days (clean before the database's now() minus that many "
                              "days)")
    if keep_days is not None:
        days = _keep_days(keep_days)
        assert now is not None
        before = now - dt.timedelta(days=days)
    else:
        # Names clean_before_timestamp itself when the value is not a timestamp.
        when = _timestamp(clean_before_timestamp)
        assert when is not None
        before = when
    if not isinstance(skip_archive, bool):
        raise InvalidArgument(f"skip_archive must be true or false, got {skip_archive!r}")
    return run.Request(before, _tables(tables), _dag_ids("dag_ids", dag_ids),
                       _dag_ids("exclude_dag_ids", exclude_dag_ids),
                       batch_size_for(settings, batch_size), skip_archive, False,
                       settings.protect_unfinished_dag_runs, settings.lock_timeout_ms,
                       settings.statement_timeout_ms)


@app.task(name=DB_CLEAN, bind=True, acks_late=True,
          soft_time_limit=max(1, settings.lock_ttl_seconds - 5),
          time_limit=settings.lock_ttl_seconds)
def db_clean(self: Task, clean_before_timestamp: Any = None, keep_days: Any = None,
             tables: Any = None, dag_ids: Any = None, exclude_dag_ids: Any = None,
             batch_size: Any = None, skip_archive: Any = False, source: str = "celery",
             run_id: str | None = None, expect_database: Any = None) -> dict[str, Any]:
    """Start a db-clean run (`airflow db clean` on the workers): its tables in Airflow's order,
    each table's chunks on any worker, the next table once they are all done. ``keep_days``
    (beat's) cleans before the database's now() minus that many days. ``expect_database``
    (workers.identity, as the CLI read its own) refuses a run meant for another database."""
    if not isinstance(source, str):
        raise InvalidArgument(f"source must be a string, got {source!r}")
    run_id = check_run_id(run_id if run_id is not None else f"dbclean-{self.request.id}")
    structlog.contextvars.bind_contextvars(run_id=run_id)
    ctx = context()
    expected = None if expect_database is None else DatabaseIdentity.decode(expect_database)
    try:
        if expected is not None:
            with ctx.engine.connect() as conn:
                identity = read_identity(conn, resources().tables.naming)
            if identity != expected:
                why = other_database(expected, identity)
                ctx.registry.close_queued(run_id, why)
                ctx.registry.note_trigger("refused", run_id, source, why)
                log.warning("db_clean_refused_database", expected=str(expected),
                            database=str(identity))
                return {"run_id": run_id, "status": "refused", "reason": why}
        now = None
        if keep_days is not None:
            with ctx.engine.connect() as conn:
                now = db_now(conn)
        request = request_from_args(clean_before_timestamp, keep_days, tables, dag_ids,
                                    exclude_dag_ids, batch_size, skip_archive, now)
        return distributed.start(ctx, run_id, request, source)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
        if ctx.registry.get(run_id) is not None and \
                ctx.registry.fail(run_id, error) == "failed":
            ctx.registry.note_trigger("failed", run_id, source, error)
        log.error("db_clean_run_failed", run_id=run_id, error=error)
        raise


def _check_chunk(run_id: Any, chunk: Any, table: Any, lo: Any, hi: Any) -> None:
    check_run_id(run_id)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InvalidArgument(f"chunk must be a whole number from 1, got {chunk!r}")
    if not isinstance(table, str) or not table:
        raise InvalidArgument(f"table must be a table name, got {table!r}")
    for name, value in (("lo", lo), ("hi", hi)):
        if value is not None and not isinstance(value, str):
            raise InvalidArgument(f"{name} must be an encoded key or null, got {value!r}")


@app.task(name=DB_CLEAN_CHUNK, bind=True, max_retries=10, ignore_result=True, acks_late=True)
def db_clean_chunk(self: Task, run_id: str, chunk: int, table: str, lo: str | None,
                   hi: str | None) -> dict[str, Any]:
    """Move one chunk: its dependants, then archive and delete in one transaction."""
    from workers.tasks import _backoff, _retry_error, is_transient

    _check_chunk(run_id, chunk, table, lo, hi)
    structlog.contextvars.bind_contextvars(run_id=run_id)
    ctx = context(in_chunk=True)
    try:
        outcome = distributed.run_chunk(ctx, run_id, chunk, table, lo, hi)
    except DBAPIError as exc:
        if is_transient(exc) and self.request.retries < self.max_retries:
            log.warning("db_clean_chunk_retry", chunk=chunk, table=table,
                        error=type(exc).__name__, retries=self.request.retries)
            distributed.requeue(ctx, run_id, chunk, _retry_error(exc))
            raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from exc
        distributed.fail_chunk(ctx, run_id, chunk, table,
                               " ".join(str(exc.orig or exc).split())[:500])
        return {"run_id": run_id, "chunk": chunk, "status": "failed"}
    except SoftTimeLimitExceeded:
        # Raised inside the driver, mid-statement: the connection it interrupted still has its
        # command in progress, and a pool that took it back would hand it to the next chunk
        # ("another command is already in progress") while the server keeps the statement's
        # transaction open. Close this process's connections; the database rolls back.
        ctx.engine.dispose()
        raise  # its heartbeat stops: the chunk is sent again (a few times at most)
    except InvalidArgument:
        raise
    except Exception as exc:  # a bug would fail the same way again: its table fails now
        distributed.fail_chunk(ctx, run_id, chunk, table, f"{type(exc).__name__}: {exc}"[:500])
        raise
    return {"run_id": run_id, "chunk": chunk, "status": outcome.status, "rows": outcome.rows}


@app.task(name=DB_CLEAN_PUMP, soft_time_limit=60, time_limit=90)
def db_clean_pump(run_id: str | None = None) -> dict[str, Any]:
    """Step the active db-clean run: resend lost chunks, send held ones once flow control lets
    them go. Beat sends one every STATESWEEP_PUMP_INTERVAL_SECONDS while db-clean is on, and so
    does `db-clean` while it waits."""
    ctx = context()
    run_id = run_id or ctx.store.active_run()
    if run_id is None:
        return {"run_id": None}
    check_run_id(run_id)
    distributed.step(ctx, run_id)
    record = ctx.registry.get(run_id)
    return {"run_id": run_id, "state": record.state if record else None}
