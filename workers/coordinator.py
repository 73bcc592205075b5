"""A cleanup run, as plain functions: the Celery tasks and the CLI's ``--local`` call these.

coordinate()   takes the single-flight lock, fixes the cutoff from the database clock, cuts
               id ranges on the server and hands each to *dispatch* the moment it is cut.
run_chunk()    validates a chunk's arguments, deletes it in its own transaction, counts it once
               into the run's progress, and finishes the run if it was the last.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import Engine

from workers import cleanup
from workers.exceptions import InvalidArgument, NotFound, StatesweepError
from workers.runs import RunRecord, RunRegistry
from workers.schema import Tables
from workers.settings import Settings
from workers.store import load_backend

log = structlog.get_logger("statesweep.coordinator")

Dispatch = Callable[[str, cleanup.Chunk, str], None]


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise InvalidArgument(f"batch_size must be a whole number, got {batch_size!r}")
    if batch_size < 0:
        raise InvalidArgument(f"batch_size must not be negative, got {batch_size}")
    return batch_size


def batch_size_for(settings: Settings, batch_size: Any = None) -> int:
    """The batch size of one run or sweep: the argument if given, else the setting; checked."""
    return check_batch_size(settings.cleanup_batch_size if batch_size is None else batch_size)


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    status: str  # started | finished | skipped | resumed | custom_backend
    cutoff: str = ""
    chunks: int = 0
    expected_rows: int = 0
    active_run_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class LockLost(StatesweepError):
    """The single-flight lock expired or passed to another run while this one was planning."""


class LockKeeper:
    """Renews the single-flight lock on a timer while planning.

    A timer, not the planning loop, so one slow planning query (batch size 0 on a big table)
    cannot outlast the TTL. If a renewal finds the lock gone or held by another run, ``lost``
    is set and the planning loop stops: two coordinators must never plan at once.
    """

    def __init__(self, registry: RunRegistry, run_id: str, ttl: int) -> None:
        self.registry, self.run_id, self.ttl = registry, run_id, ttl
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_until_stopped, daemon=True,
                                        name=f"statesweep-lock-{run_id}")

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.registry.renew(self.run_id, self.ttl):
                    self.lost = True
                    return
            except Exception as exc:  # a blip: two more tries before the TTL runs out
                log.warning("lock_renew_failed", run_id=self.run_id,
                            error=f"{type(exc).__name__}: {exc}")

    def check(self) -> None:
        if self.lost:
            raise LockLost(f"run {self.run_id} lost the single-flight lock while planning; "
                           "stopping so that two runs never plan at once")

    def __enter__(self) -> LockKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def coordinate(settings: Settings, engine: Engine, tables: Tables, registry: RunRegistry,
               dispatch: Dispatch, *, run_id: str | None = None, batch_size: int | None = None,
               source: str = "beat", clock: Callable[[], float] = time.time) -> RunSummary:
    """Plan one cleanup run and dispatch its chunks; at most one run is active at a time.

    A trigger that finds the active run stalled sends that run's missing chunks again instead
    (see resume_if_stalled); *clock* is injectable for that check."""
    batch = batch_size_for(settings, batch_size)
    run_id = run_id or new_run_id()
    bound = log.bind(run_id=run_id, source=source)

    if not settings.uses_metastore_backend:
        bound.info("custom backend configured; skipping", backend=settings.state_backend)
        load_backend(settings, engine, tables).cleanup()
        return RunSummary(run_id, "custom_backend")

    holder = registry.acquire(run_id, settings.lock_ttl_seconds)
    if holder is not None:
        resumed = resume_if_stalled(settings, registry, dispatch, holder, clock=clock)
        if resumed is not None:
            return resumed
        bound.info("coordinator_skipped_active_run", active_run_id=holder)
        return RunSummary(run_id, "skipped", active_run_id=holder)

    _close_abandoned_runs(registry, run_id)
    try:
        cutoff = cleanup.read_cutoff(engine)
        cutoff_iso = cutoff.isoformat()
        registry.start(run_id, cutoff=cutoff_iso, batch_size=batch, source=source)
        bound.info("cleanup_run_started", cutoff=cutoff_iso, batch_size=batch,
                   table=tables.task_state.name)
        chunks = expected = 0
        t0 = time.perf_counter()
        with LockKeeper(registry, run_id, settings.lock_ttl_seconds) as keeper:
            for chunk in cleanup.plan_chunks(engine, tables, cutoff, batch):
                keeper.check()
                # Count before sending: a fast worker must never finish a chunk the run has
                # not yet counted as planned.
                registry.add_chunk(run_id, chunk.expected, (chunk.number, chunk.lo, chunk.hi))
                dispatch(run_id, chunk, cutoff_iso)
                chunks += 1
                expected += chunk.expected
            keeper.check()
            # Once planned, the run holds the lock until its last chunk finishes; each chunk
            # renews it, and a run whose chunks all vanished frees it after
            # run_timeout_seconds. Nothing but expiry or another run can have taken it.
            if not registry.renew(run_id, settings.run_timeout_seconds):
                holder = registry.acquire(run_id, settings.run_timeout_seconds)
                if holder is not None:
                    raise LockLost(f"run {run_id} lost the single-flight lock to {holder}")
        finished = registry.finish_planning(run_id)
        bound.info("cleanup_run_planned", chunks=chunks, expected_rows=expected,
                   ms=round((time.perf_counter() - t0) * 1000, 1))
        if finished is not None:
            log_finished(finished)
            return RunSummary(run_id, "finished", cutoff_iso, chunks, expected)
        return RunSummary(run_id, "started", cutoff_iso, chunks, expected)
    except BaseException as exc:
        registry.fail(run_id, f"{type(exc).__name__}: {exc}")
        bound.error("cleanup_run_failed", error=f"{type(exc).__name__}: {exc}")
        raise


def resume_if_stalled(settings: Settings, registry: RunRegistry, dispatch: Dispatch,
                      active_run_id: str, *, clock: Callable[[], float] = time.time,
                      ) -> RunSummary | None:
    """Send again the chunks of the active run that never finished, if it has stalled.

    Redis's BRPOP takes a message off the queue before kombu records it as unacknowledged, so
    a worker killed between the two loses that message for good: its rows stay (still expired)
    but the run would hold the single-flight lock until run_timeout_seconds. A run planned and
    without a finished chunk for settings.stall_after_seconds is past any redelivery, so its
    missing chunks are sent again; chunks are idempotent and counted once, so a chunk that was
    only slow costs a no-op DELETE. Returns None when the run is healthy.
    """
    record = registry.get(active_run_id)
    if record is None or record.state != "running" or not record.planning_done:
        return None
    now = clock()
    quiet = now - max(record.planned_at, record.last_progress_at)
    if quiet < settings.stall_after_seconds:
        return None
    missing = registry.missing_chunks(active_run_id)
    if not missing:
        return None
    registry.renew(active_run_id, settings.run_timeout_seconds)
    registry.note_progress(active_run_id, now)  # one resume per stall period, not per trigger
    for number, lo, hi in missing:
        dispatch(active_run_id, cleanup.Chunk(number, lo, hi, 0), record.cutoff)
    log.warning("cleanup_run_resumed", run_id=active_run_id, chunks=len(missing),
                quiet_seconds=round(quiet, 1))
    return RunSummary(active_run_id, "resumed", record.cutoff, len(missing),
                      active_run_id=active_run_id)


def _close_abandoned_runs(registry: RunRegistry, run_id: str) -> None:
    """Mark runs still 'planning' as failed: we hold the lock, so their coordinator is gone
    (killed mid-plan, its lock expired). Chunks it sent still run and count; only the record
    stops claiming a plan is in progress."""
    for record in registry.recent(20):
        if record.state == "planning" and record.run_id != run_id:
            registry.fail(record.run_id, "abandoned: the coordinator stopped while planning "
                                         "and its lock expired")
            log.warning("cleanup_run_abandoned", run_id=record.run_id, next_run_id=run_id)


def log_finished(record: RunRecord) -> None:
    log.info("cleanup_run_finished", run_id=record.run_id, state=record.state,
             rows=record.rows_deleted, chunks=record.chunks_done,
             chunks_failed=record.chunks_failed, duration=round(record.duration, 3),
             rows_per_second=round(record.rows_per_second, 1))


@dataclass(frozen=True)
class ChunkArgs:
    run_id: str
    chunk: int
    lo: int
    hi: int
    cutoff: dt.datetime


def check_chunk_args(run_id: Any, chunk: Any, lo: Any, hi: Any, cutoff: Any) -> ChunkArgs:
    """Validate a chunk message before touching the database; raises InvalidArgument."""
    if not isinstance(run_id, str) or not run_id:
        raise InvalidArgument(f"run_id must be a non-empty string, got {run_id!r}")
    for name, value in (("chunk", chunk), ("lo", lo), ("hi", hi)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"{name} must be a whole number, got {value!r}")
    if lo > hi:
        raise InvalidArgument(f"lo must not exceed hi, got lo={lo} hi={hi}")
    if not isinstance(cutoff, str):
        raise InvalidArgument(f"cutoff must be an ISO-8601 string, got {cutoff!r}")
    try:
        when = dt.datetime.fromisoformat(cutoff)
    except ValueError:
        raise InvalidArgument(f"cutoff is not an ISO-8601 timestamp: {cutoff!r}") from None
    if when.tzinfo is None:
        raise InvalidArgument(f"cutoff must carry a UTC offset, got {cutoff!r}")
    return ChunkArgs(run_id, chunk, lo, hi, when.astimezone(dt.UTC))


class ProgressNotRecorded(Exception):
    """The chunk's rows were deleted and committed, but the run store could not count them."""

    def __init__(self, rows: int) -> None:
        super().__init__(f"{rows} rows deleted but not yet counted")
        self.rows = rows


def run_chunk(settings: Settings, engine: Engine, tables: Tables, registry: RunRegistry,
              args: ChunkArgs, *, carried_rows: int = 0) -> int:
    """Delete one chunk, count it once, finish the run if it was the last. Returns rows.

    *carried_rows* are rows an earlier attempt deleted but could not count (see
    ProgressNotRecorded); they are added to this attempt's count.
    """
    record = registry.get(args.run_id)
    if record is None:
        raise NotFound(f"unknown run id {args.run_id!r}: no such cleanup run is recorded")
    if record.cutoff and dt.datetime.fromisoformat(record.cutoff) != args.cutoff:
        raise InvalidArgument(
            f"cutoff {args.cutoff.isoformat()} is not run {args.run_id}'s cutoff {record.cutoff}")
    t0 = time.perf_counter()
    rows = cleanup.delete_chunk(engine, tables, args.lo, args.hi, args.cutoff,
                                lock_timeout_ms=settings.lock_timeout_ms,
                                statement_timeout_ms=settings.statement_timeout_ms)
    rows += carried_rows
    ms = round((time.perf_counter() - t0) * 1000, 1)
    try:
        counted, finished = registry.chunk_done(args.run_id, args.chunk, rows,
                                                settings.run_timeout_seconds,
                                                seconds=ms / 1000, table=tables.task_state.name)
    except Exception as exc:
        raise ProgressNotRecorded(rows) from exc
    log.info("chunk_deleted", run_id=args.run_id, chunk=args.chunk, lo=args.lo, hi=args.hi,
             rows=rows, ms=ms, counted=counted)
    if finished is not None:
        log_finished(finished)
    return rows


def run_local(settings: Settings, engine: Engine, tables: Tables, registry: RunRegistry, *,
              batch_size: int | None = None, source: str = "local",
              on_chunk: Callable[[cleanup.Chunk, int], None] | None = None) -> RunSummary:
    """Plan and delete in this process, chunk by chunk, each committed on its own (for cron
    users and small databases: no broker needed)."""
    def dispatch(run_id: str, chunk: cleanup.Chunk, cutoff: str) -> None:
        rows = run_chunk(settings, engine, tables, registry,
                         check_chunk_args(run_id, chunk.number, chunk.lo, chunk.hi, cutoff))
        if on_chunk is not None:
            on_chunk(chunk, rows)

    return coordinate(settings, engine, tables, registry, dispatch, batch_size=batch_size,
                      source=source)
