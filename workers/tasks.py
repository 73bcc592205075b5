"""The three Celery tasks. They handle messaging, retries and routing; the work is in
``workers.coordinator`` and ``workers.cleanup``, which are plain functions."""

from __future__ import annotations

import re
import time
from typing import Any

import structlog
from celery import Task
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, OperationalError

from workers import cleanup, coordinator
from workers.celery_app import COORDINATE, DELETE_CHUNK, SWEEP_ORPHANS, app, resources, settings
from workers.exceptions import InvalidArgument, NotFound

log = structlog.get_logger("statesweep.tasks")

# Connection loss, lock timeouts and statement timeouts are worth retrying; bad arguments are not.
TRANSIENT = (DBAPIError, RedisConnectionError, RedisTimeoutError)


def is_transient(exc: BaseException) -> bool:
    """Lock and statement timeouts and lost connections surface as OperationalError; a
    connection that died mid-statement may surface as another DBAPIError that SQLAlchemy marks
    as invalidated. Integrity or programming errors would fail the same way again."""
    if isinstance(exc, (OperationalError, RedisConnectionError, RedisTimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


# A caller-chosen run id becomes part of Redis keys and log lines: keep it short and plain.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


@app.task(name=COORDINATE, bind=True, acks_late=False,
          soft_time_limit=max(1, settings.run_timeout_seconds - 30),
          time_limit=settings.run_timeout_seconds)
def coordinate(self: Task, batch_size: int | None = None, source: str = "beat",
               run_id: str | None = None) -> dict[str, Any]:
    """Plan a cleanup run and send its chunks. Acknowledged on receipt: a coordinator that dies
    mid-plan is not redelivered; its lock expires and the next trigger plans afresh.

    *run_id* lets an ad-hoc caller (the CLI) know the run's id before the run starts, so it can
    follow the run without waiting for planning to finish."""
    if batch_size is not None:
        coordinator.check_batch_size(batch_size)
    if not isinstance(source, str):
        raise InvalidArgument(f"source must be a string, got {source!r}")
    if run_id is not None and (not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id)):
        raise InvalidArgument(
            f"run_id must be 1-64 letters, digits, '.', '_', ':' or '-', got {run_id!r}")
    r = resources()
    run_id = run_id or coordinator.new_run_id()
    structlog.contextvars.bind_contextvars(run_id=run_id)

    def dispatch(run_id: str, chunk: cleanup.Chunk, cutoff: str) -> None:
        delete_chunk.apply_async(
            kwargs={"run_id": run_id, "chunk": chunk.number, "lo": chunk.lo, "hi": chunk.hi,
                    "cutoff": cutoff},
            queue=settings.chunk_queue,
        )

    summary = coordinator.coordinate(r.settings, r.engine, r.tables, r.registry, dispatch,
                                     run_id=run_id, batch_size=batch_size, source=source)
    return summary.as_dict()


class ChunkTask(Task):
    """Records a chunk that failed for good in its run, so the run ends 'failed' at once rather
    than holding the single-flight lock until run_timeout_seconds."""

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        if isinstance(exc, (InvalidArgument, NotFound)):
            return  # a malformed or forged message is no chunk of the run it names
        run_id, chunk = kwargs.get("run_id"), kwargs.get("chunk")
        if not isinstance(run_id, str) or isinstance(chunk, bool) or not isinstance(chunk, int):
            return
        error = f"chunk {chunk} failed: {type(exc).__name__}: {exc}"
        log.error("chunk_failed", run_id=run_id, chunk=chunk, error=error)
        try:
            ended = resources().registry.chunk_failed(run_id, chunk, error)
        except Exception as record_exc:  # the run store is down too; the lock TTL frees it
            log.warning("chunk_failure_not_recorded", run_id=run_id, chunk=chunk,
                        error=type(record_exc).__name__)
            return
        if ended is not None:
            coordinator.log_finished(ended)


@app.task(name=DELETE_CHUNK, bind=True, base=ChunkTask, max_retries=10)
def delete_chunk(self: Task, run_id: str, chunk: int, lo: int, hi: int, cutoff: str,
                 carried_rows: int = 0) -> dict[str, Any]:
    """Delete one id range in its own transaction. Redelivery and retries are safe: the DELETE
    re-checks expires_at < cutoff, and the run counts each chunk number once."""
    args = coordinator.check_chunk_args(run_id, chunk, lo, hi, cutoff)
    structlog.contextvars.bind_contextvars(run_id=run_id)
    r = resources()
    try:
        rows = coordinator.run_chunk(r.settings, r.engine, r.tables, r.registry, args,
                                     carried_rows=carried_rows)
    except coordinator.ProgressNotRecorded as exc:
        # The rows are deleted and committed; only the count failed. Carry it into the retry.
        raise self.retry(exc=exc.__cause__ or exc, countdown=_backoff(self.request.retries),
                         kwargs={"run_id": run_id, "chunk": chunk, "lo": lo, "hi": hi,
                                 "cutoff": cutoff, "carried_rows": exc.rows}) from exc
    except TRANSIENT as exc:
        if not is_transient(exc):
            raise
        log.warning("chunk_retry", run_id=run_id, chunk=chunk, error=type(exc).__name__,
                    retries=self.request.retries)
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from exc
    return {"run_id": run_id, "chunk": chunk, "lo": lo, "hi": hi, "rows": rows}


def _backoff(retries: int) -> float:
    """One second plus exponential backoff with full jitter, capped at a minute.

    At least a second: with RabbitMQ quorum queues Celery sends a countdown through its delay
    queues as int(countdown) seconds and refuses one under a second ("countdown must be a
    positive number"), rejecting the retry and losing the chunk's message."""
    import random

    return 1.0 + random.uniform(0, min(60.0, 0.5 * 2 ** retries))


@app.task(name=SWEEP_ORPHANS, bind=True, max_retries=5)
def sweep_orphaned_asset_state(self: Task, batch_size: int | None = None) -> dict[str, Any]:
    """Delete asset state of assets that are no longer active, in committed batches."""
    batch = coordinator.batch_size_for(settings, batch_size)
    # Not a cleanup run, but its lines carry a run id like every task's; stable across retries.
    run_id = f"orphans-{self.request.id}"
    structlog.contextvars.bind_contextvars(run_id=run_id)
    r = resources()
    t0 = time.perf_counter()

    def on_batch(rows: int, ms: float) -> None:
        log.info("orphan_batch_deleted", rows=rows, ms=round(ms, 1))

    try:
        result = cleanup.sweep_orphaned_asset_state(
            r.engine, r.tables, batch, lock_timeout_ms=settings.lock_timeout_ms,
            statement_timeout_ms=settings.statement_timeout_ms, on_batch=on_batch)
    except TRANSIENT as exc:
        if not is_transient(exc):
            raise
        log.warning("orphan_sweep_retry", error=type(exc).__name__, retries=self.request.retries)
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from exc
    seconds = time.perf_counter() - t0
    log.info("orphaned_asset_state_swept", rows=result.rows, batches=result.batches,
             seconds=round(seconds, 3), table=r.tables.asset_state.name)
    return {"run_id": run_id, "rows": result.rows, "batches": result.batches,
            "seconds": round(seconds, 3)}
