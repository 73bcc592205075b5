"""The Celery tasks. They handle messaging, retries and routing; the work is in plain functions
(``workers.coordinator``, ``workers.chunk``, ``workers.window``, ``workers.control``)."""

from __future__ import annotations

import inspect
import json
import random
import time
from typing import Any

import structlog
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, OperationalError

from workers import chunk as chunks
from workers import cleanup, control, coordinator, metrics
from workers.celery_app import (
    ABORT,
    COORDINATE,
    DELETE_CHUNK,
    PAUSE,
    PUMP,
    RESUME,
    SWEEP_ORPHANS,
    app,
    resources,
    settings,
)
from workers.chunk_failures import (
    counted_already,
    log_interrupted_after_counted,
    record_chunk_failure,
)
from workers.exceptions import InvalidArgument, NotFound
from workers.identity import DatabaseIdentity, other_database, read_identity
from workers.planners import EXPIRY, ChunkRange
from workers.selection import Selection
from workers.window import Sender, gate, wait_out_lag

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


def send_chunk(run_id: str, number: int, rng: ChunkRange, cutoff: str) -> None:
    delete_chunk.apply_async(
        kwargs={"run_id": run_id, "chunk": number, "kind": rng.kind, "lo": rng.lo,
                "hi": rng.hi, "cutoff": cutoff,
                **({"lo_id": rng.lo_id, "hi_id": rng.hi_id} if rng.kind == EXPIRY else {})},
        queue=settings.chunk_queue)


def send_pump_soon(run_id: str) -> None:
    """Ask for one pump of *run_id* (deduplicated): it waits out replica lag and sends the
    parked chunks. Holds that lift by a person or a clock are pumped by beat and `resume`."""
    r = resources()
    if r.registry.client.set(f"{settings.key_prefix}:pump:{run_id}", "1", nx=True, ex=30):
        pump.apply_async(kwargs={"run_id": run_id}, queue=settings.control_queue)


def _on_held(run_id: str) -> Any:
    def held(reason: str) -> None:
        if reason.startswith("replica lag"):
            send_pump_soon(run_id)
    return held


@app.task(name=COORDINATE, bind=True, acks_late=True,
          soft_time_limit=max(1, settings.lock_ttl_seconds - 5),
          time_limit=settings.lock_ttl_seconds)
def coordinate(self: Task, batch_size: int | None = None, source: str = "beat",
               run_id: str | None = None, dag_ids: Any = None, exclude_dag_ids: Any = None,
               clean_before_timestamp: Any = None,
               clean_grace_seconds: Any = None, expect_database: Any = None) -> dict[str, Any]:
    """Plan a cleanup run and send its first window. Planning takes milliseconds, so the task
    is acknowledged late: a coordinator killed mid-plan is redelivered, and its run id (the
    caller's, else this task's id) makes the redelivered copy resume rather than plan twice.
    ``dag_ids``, ``exclude_dag_ids`` (comma-separated or lists) and ``clean_before_timestamp``
    (ISO-8601) narrow the run as ``airflow db clean`` does; ``clean_grace_seconds`` is beat's
    grace period, a cutoff that many seconds before the database's now(). ``expect_database``
    (workers.identity, as the CLI read its own) refuses a run meant for another database."""
    if batch_size is not None:
        coordinator.check_batch_size(batch_size)
    selection = Selection.from_args(dag_ids, exclude_dag_ids, clean_before_timestamp,
                                    clean_grace_seconds)
    if not isinstance(source, str):
        raise InvalidArgument(f"source must be a string, got {source!r}")
    run_id = coordinator.check_run_id(run_id if run_id is not None
                                      else _run_id_of_message(str(self.request.id)))
    expected = None if expect_database is None else DatabaseIdentity.decode(expect_database)
    structlog.contextvars.bind_contextvars(run_id=run_id)
    try:
        r = resources()
        with r.engine.connect() as conn:
            identity = read_identity(conn, r.tables.naming)
    except Exception as exc:  # the database went away: coordinate() never ran to record it
        _note_failed_trigger(run_id, source, exc)
        raise
    if expected is not None and expected != identity:
        return _refuse_other_database(r.registry, run_id, source, expected, identity)
    # What the pump sends again, with this run id, should this delivery die mid-plan.
    request = json.dumps({
        "batch_size": batch_size, "source": source, "dag_ids": dag_ids,
        "exclude_dag_ids": exclude_dag_ids, "clean_before_timestamp": clean_before_timestamp,
        "clean_grace_seconds": clean_grace_seconds, "expect_database": expect_database},
        default=str)
    summary = coordinator.coordinate(r.settings, r.engine, r.tables, r.registry, send_chunk,
                                     run_id=run_id, batch_size=batch_size, source=source,
                                     selection=selection, database=str(identity),
                                     request=request)
    return summary.as_dict()


def replan(registry: Any, run_id: str) -> bool:
    """Send the coordinator of a run left in planning by a coordinator that died (its planning
    heartbeat lapsed) again, with its arguments and run id: True if sent. The copy takes the
    dead delivery's claim over and plans the run; at most one resend per period."""
    request = registry.replan(run_id)
    if request is None:
        return False
    kwargs = {k: v for k, v in json.loads(request).items() if v is not None}
    coordinate.apply_async(kwargs={**kwargs, "run_id": run_id}, queue=settings.control_queue)
    log.warning("coordinator_resent", run_id=run_id,
                reason="its coordinator stopped beating while it planned")
    return True


def _refuse_other_database(registry: Any, run_id: str, source: str,
                           expected: DatabaseIdentity, identity: DatabaseIdentity
                           ) -> dict[str, Any]:
    """The trigger names another database than the workers clean: nothing is planned or
    deleted; its queued run ends skipped, saying both."""
    why = other_database(expected, identity)
    registry.close_queued(run_id, why)
    registry.note_trigger("refused", run_id, source, why)
    log.warning("coordinator_refused_database", run_id=run_id, expected=str(expected),
                database=str(identity))
    return {"run_id": run_id, "status": "refused", "reason": why}


def _run_id_of_message(message_id: str) -> str:
    """A trigger that names no run id (beat, ``celery call``, Flower) gets one in the CLI's one
    format, the same for each redelivery of its message; with the run store unreachable, the
    message id (planning needs the run store anyway, and says so)."""
    from workers.run_ids import new_run_id
    from workers.runs import registry_for

    try:
        registry = registry_for(settings.effective_run_store_url, settings.key_prefix)
        return registry.run_id_for_delivery(message_id, new_run_id())
    except Exception:  # noqa: BLE001 - the trigger fails at planning, naming the run store
        return message_id


def _note_failed_trigger(run_id: str, source: str, exc: Exception) -> None:
    """Record a trigger that failed before planning (so `status` lists it), if the run store
    answers; it is Redis, not the database, so it usually does."""
    from workers.runs import registry_for
    from workers.settings import mask_secrets

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    error = mask_secrets(f"{type(exc).__name__}: {text}")
    try:
        registry = registry_for(settings.effective_run_store_url, settings.key_prefix)
        registry.fail(run_id, error)
        registry.note_trigger("failed", run_id, source, error)
    except Exception as record_exc:
        log.warning("failed_trigger_not_recorded", run_id=run_id,
                    error=type(record_exc).__name__)
    log.error("cleanup_run_failed", run_id=run_id, error=error)


def _fits_signature(task: Task, args: Any, kwargs: Any) -> bool:
    """Whether a message's arguments bind to the task's parameters: one with arguments missing
    or unknown never ran (Python refused the call), so it is no failed chunk of any run."""
    try:
        inspect.signature(task.run).bind(*(args or ()), **(kwargs or {}))
    except TypeError:
        return False
    return True


class ChunkTask(Task):
    """Records a chunk that failed for good in its run, so the run ends 'failed' once its window
    drains rather than holding the single-flight lock until run_timeout_seconds."""

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        if isinstance(exc, (InvalidArgument, NotFound)) or not _fits_signature(self, args,
                                                                                  kwargs):
            return  # a malformed or forged message is no chunk of the run it names
        run_id, number = kwargs.get("run_id"), kwargs.get("chunk")
        if not isinstance(run_id, str) or isinstance(number, bool) or not isinstance(number, int):
            return
        error = f"chunk {number} failed: {type(exc).__name__}: {exc}"
        try:
            r = resources()
        except Exception as resources_exc:  # the database is down: the run store is not read
            log.warning("chunk_failure_not_recorded", run_id=run_id, chunk=number, error=error,
                        store_error=type(resources_exc).__name__)
            return
        # Logged as what the run store counted: the hard time limit also ends a chunk counted
        # already (it was sending the next chunks to a broker that was down).
        finished = record_chunk_failure(
            r.registry, run_id, number, str(kwargs.get("kind", "")), error,
            lock_ttl=settings.run_timeout_seconds, window=settings.max_chunks_in_flight,
            gate=gate(settings), table=r.tables.task_state.name)
        if finished is not None:
            coordinator.log_finished(finished)


@app.task(name=DELETE_CHUNK, bind=True, base=ChunkTask, max_retries=10, ignore_result=True,
          send_events=settings.chunk_task_events)
def delete_chunk(self: Task, run_id: str, chunk: int, kind: str, lo: int, hi: int | None,
                 cutoff: str, carried_rows: int = 0, lo_id: int = 0,
                 hi_id: int = 0) -> dict[str, Any]:
    """Delete one range in its own transaction. Redelivery and retries are safe: the message
    must match its run's window, the DELETE re-checks expires_at < cutoff, and the run counts
    each chunk number once. An expiry range's keys carry ids too (lo_id, hi_id)."""
    args = chunks.check_chunk_args(run_id, chunk, kind, lo, hi, cutoff, lo_id, hi_id)
    structlog.contextvars.bind_contextvars(run_id=run_id)
    r = resources()
    try:
        result = chunks.run_chunk(r.settings, r.engine, r.tables, r.registry, send_chunk, args,
                                  carried_rows=carried_rows, on_held=_on_held(run_id))
    except chunks.ProgressNotRecorded as exc:
        # The rows are deleted and committed; only the count failed. Carry it into the retry.
        metrics.count_retry(r.registry)
        _requeue(r.registry, run_id, chunk)
        raise self.retry(exc=exc.__cause__ or exc, countdown=_backoff(self.request.retries),
                         kwargs={**self.request.kwargs, "carried_rows": exc.rows}) from exc
    except TRANSIENT as exc:
        if not is_transient(exc):
            raise
        if "lock timeout" in str(exc).lower() or "lock wait timeout" in str(exc).lower():
            r.registry.shrink(run_id)
        log.warning("chunk_retry", run_id=run_id, chunk=chunk, error=type(exc).__name__,
                    retries=self.request.retries)
        metrics.count_retry(r.registry)
        _requeue(r.registry, run_id, chunk, _retry_error(exc))
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from exc
    except SoftTimeLimitExceeded as exc:
        if not counted_already(r.registry, run_id, chunk):
            raise
        # Its DELETE committed and was counted; the limit cut short what came after (sending
        # the next chunks to a broker that stopped answering): not a failed chunk.
        log_interrupted_after_counted(run_id, chunk, f"chunk {chunk}: {type(exc).__name__}")
        return {"run_id": run_id, "chunk": chunk, "rows": 0, "status": "counted"}
    return {"run_id": run_id, "chunk": chunk, "rows": result.rows, "status": result.status}


def _retry_error(exc: BaseException) -> str:
    """A transient error as the run record keeps it: its type and first line, secrets masked."""
    from workers.settings import mask_secrets

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return mask_secrets(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _requeue(registry: Any, run_id: str, chunk: int, error: str = "") -> None:
    """The chunk waits for its retry: no heartbeat is due (else the pump would send a second
    copy to run beside the retry). A run store that is down costs at most that copy."""
    try:
        registry.requeue(run_id, chunk, error)
    except Exception:
        log.warning("chunk_requeue_not_recorded", run_id=run_id, chunk=chunk)


def _backoff(retries: int) -> float:
    """One second plus exponential backoff with full jitter, capped at a minute.

    At least a second: with RabbitMQ quorum queues Celery sends a countdown through its delay
    queues as int(countdown) seconds and refuses one under a second ("countdown must be a
    positive number"), rejecting the retry and losing the chunk's message."""
    return 1.0 + random.uniform(0, min(60.0, 0.5 * 2 ** retries))


@app.task(name=PUMP, bind=True, soft_time_limit=60, time_limit=90)
def pump(self: Task, run_id: str | None = None) -> dict[str, Any]:
    """Top up the active run's window: send parked chunks once a hold has lifted, chunks whose
    message was lost, and new chunks. Beat sends one every STATESWEEP_PUMP_INTERVAL_SECONDS;
    a run held by replica lag gets one that waits the lag out."""
    r = resources()
    run_id = run_id or r.registry.active_run()
    if run_id is None:
        return {"run_id": None, "sent": 0}
    coordinator.check_run_id(run_id)
    r.registry.client.delete(f"{settings.key_prefix}:pump:{run_id}")
    sender = Sender(r.settings, r.engine, r.tables, r.registry, send_chunk)
    record, window = sender.pump(run_id)
    if record is not None and record.state == "planning":
        return {"run_id": run_id, "sent": 0, "held": "", "state": "planning",
                "replanned": replan(r.registry, run_id)}
    if window.held.startswith("replica lag") and not wait_out_lag(sender, run_id):
        send_pump_soon(run_id)  # still lagging: hand over rather than hold a worker for long
    return {"run_id": run_id, "sent": len(window.chunks), "held": window.held,
            "state": record.state if record else None}


@app.task(name=PAUSE)
def pause(seconds: float | None = None, reason: str = "", by: str = "celery") -> dict[str, Any]:
    return control.pause(resources().registry, by=by, reason=reason, seconds=seconds).as_dict()


@app.task(name=RESUME)
def resume(by: str = "celery") -> dict[str, Any]:
    r = resources()
    lifted = control.resume(r.registry, by=by)
    pump.apply_async(queue=settings.control_queue)
    return {"resumed": True, "was": lifted.as_dict()}


@app.task(name=ABORT)
def abort(run_id: str, by: str = "celery") -> dict[str, Any]:
    return control.abort(resources().registry, run_id, by=by).as_dict()


@app.task(name=SWEEP_ORPHANS, bind=True, max_retries=5, acks_late=False,
          soft_time_limit=settings.orphan_soft_time_limit,
          time_limit=settings.orphan_soft_time_limit + 30)
def sweep_orphaned_asset_state(self: Task, batch_size: int | None = None,
                               expect_database: Any = None) -> dict[str, Any]:
    """Delete asset state of assets that are no longer active, in committed batches.

    Acknowledged on receipt and bounded by its own time limits: each batch commits on its own,
    so a sweep cut short by its soft limit keeps what it deleted and the next sweep goes on.
    ``expect_database`` (workers.identity): refused, nothing deleted, if it is not ours."""
    from celery.exceptions import SoftTimeLimitExceeded

    if settings.airflow_custom_backend:  # Airflow keeps its state elsewhere: nothing here
        log.info("custom backend configured; skipping", backend=settings.state_backend)
        return {"status": "custom_backend", "rows": 0, "batches": 0}

    batch = coordinator.batch_size_for(settings, batch_size)
    expected = None if expect_database is None else DatabaseIdentity.decode(expect_database)
    # Not a cleanup run, but its lines carry a run id like every task's; stable across retries.
    run_id = f"orphans-{self.request.id}"
    structlog.contextvars.bind_contextvars(run_id=run_id)
    try:
        r = resources()
        with r.engine.connect() as conn:
            identity = read_identity(conn, r.tables.naming)
    except Exception as exc:
        _record_sweep_failure(run_id, exc)
        raise
    if expected is not None and expected != identity:
        why = other_database(expected, identity)
        r.registry.record_sweep(run_id, "refused", error=why)
        log.warning("orphan_sweep_refused_database", expected=str(expected),
                    database=str(identity))
        return {"run_id": run_id, "status": "refused", "reason": why, "rows": 0, "batches": 0}
    t0 = time.perf_counter()
    done = cleanup.OrphanSweep()
    r.registry.record_sweep(run_id, "running", table=r.tables.asset_state.name)

    def on_batch(rows: int, ms: float) -> None:
        metrics.count_orphans_deleted(r.registry, r.tables.asset_state.name, rows)
        done.rows += rows
        done.batches += 1
        log.info("orphan_batch_deleted", rows=rows, ms=round(ms, 1))

    complete = True
    try:
        cleanup.sweep_orphaned_asset_state(
            r.engine, r.tables, batch, lock_timeout_ms=settings.lock_timeout_ms,
            statement_timeout_ms=settings.statement_timeout_ms, on_batch=on_batch)
    except SoftTimeLimitExceeded:
        complete = False
        log.warning("orphan_sweep_cut_short", rows=done.rows, batches=done.batches,
                    limit=settings.orphan_soft_time_limit)
    except TRANSIENT as exc:
        if not is_transient(exc) or self.request.retries >= self.max_retries:
            _record_sweep_failure(run_id, exc, done, time.perf_counter() - t0)
            raise
        log.warning("orphan_sweep_retry", error=type(exc).__name__, retries=self.request.retries)
        _record_sweep_failure(run_id, exc, done, time.perf_counter() - t0, state="retrying")
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from exc
    except Exception as exc:
        _record_sweep_failure(run_id, exc, done, time.perf_counter() - t0)
        raise
    seconds = time.perf_counter() - t0
    r.registry.record_sweep(run_id, "finished" if complete else "cut_short", rows=done.rows,
                            batches=done.batches, seconds=round(seconds, 3), error="")
    log.info("orphaned_asset_state_swept", rows=done.rows, batches=done.batches,
             seconds=round(seconds, 3), table=r.tables.asset_state.name, complete=complete)
    return {"run_id": run_id, "rows": done.rows, "batches": done.batches,
            "seconds": round(seconds, 3), "complete": complete}


def _record_sweep_failure(run_id: str, exc: BaseException, done: cleanup.OrphanSweep | None = None,
                          seconds: float = 0.0, *, state: str = "failed") -> None:
    """Record a failed (or retrying) sweep with its error, so `status` lists it; a run store
    that is down too only costs the record (the task's own failure is still logged)."""
    from workers.runs import registry_for
    from workers.settings import mask_secrets

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    try:
        registry = registry_for(settings.effective_run_store_url, settings.key_prefix)
        registry.record_sweep(run_id, state, rows=done.rows if done else 0,
                              batches=done.batches if done else 0, seconds=round(seconds, 3),
                              error=mask_secrets(f"{type(exc).__name__}: {text}"))
    except Exception as record_exc:
        log.warning("orphan_sweep_not_recorded", error=type(record_exc).__name__)
