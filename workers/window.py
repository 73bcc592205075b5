"""The in-flight window: which chunks are sent, when, and what holds them back.

A run keeps at most STATESWEEP_MAX_CHUNKS_IN_FLIGHT chunks queued or running. The coordinator
sends the first window; each finished chunk tops it up in the same atomic step that counts it
(workers.runs); the pump task (beat, every STATESWEEP_PUMP_INTERVAL_SECONDS, and after a hold)
tops it up when nothing else does. Topping up also sends again any chunk parked by a hold and
any chunk sent longer ago than ``resend_after`` without finishing (its message or its publisher
was lost), so a process killed at any instant loses no chunk: chunks are idempotent and counted
once, so a chunk that was only slow costs a DELETE that finds nothing.

Flow control is a gate on that one lever: paused, outside active hours, past the run-time
budget or replicas lagging, no chunk starts (a chunk message arriving then is parked, not run)
and the window is not topped up; when the gate opens the parked chunks go out again.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from sqlalchemy import Connection, Engine

from workers.planners import WALK, expiry, walk
from workers.planners.base import CUT_KINDS, EXPIRY, ChunkRange
from workers.runs import Gate, RunRecord, RunStore, Window
from workers.schema import Tables
from workers.settings import Settings

log = structlog.get_logger("statesweep.window")

#: The longest the walk after a run (Sender.mark_deleted) may take: 10 s is millions of rows.
MARK_TIMEOUT_MS = 10_000

#: Sends one chunk message: (run_id, chunk number, range, cutoff).
Dispatch = Callable[[str, int, ChunkRange, str], None]


def gate(settings: Settings, engine: Engine | None = None, *, now: dt.datetime | None = None,
         with_lag: bool = False) -> Gate:
    """What holds chunks back besides a pause: the active-hours window and, when *with_lag*
    and a limit is set, the replicas' lag read now (chunks read it in their own transaction)."""
    reason = ""
    hours = settings.active_hours_window
    if hours is not None:
        at = now or utcnow()
        if not hours.is_open(at):
            reason = f"outside active hours {settings.active_hours} UTC"
    if not reason and with_lag and engine is not None and settings.max_replica_lag_seconds:
        lag = replica_lag(engine, settings)
        if lag is not None and lag > settings.max_replica_lag_seconds:
            reason = lag_reason(lag, settings.max_replica_lag_seconds)
    return Gate(reason, settings.max_run_seconds)


def utcnow() -> dt.datetime:
    """The clock active hours are judged by (a function, so a test can move it)."""
    return dt.datetime.now(dt.UTC)


def lag_reason(lag: float, limit: float) -> str:
    return f"replica lag {lag:.1f}s over {limit:g}s"


def replica_lag(engine: Engine, settings: Settings | None = None) -> float | None:
    """The worst replica lag now: pg_stat_replication on a PostgreSQL primary, or each of
    STATESWEEP_REPLICA_URLS on MySQL/MariaDB; None when there is no replica."""
    with engine.connect() as conn:
        return lag_reader(settings)(conn)


def lag_reader(settings: Settings | None) -> Callable[[Connection], float | None]:
    """How this deployment reads replica lag, given a connection to the primary."""
    from workers.flow.lag import mysql_replica_lag_seconds, replica_lag_seconds

    urls = settings.replica_url_list if settings is not None else []
    if not urls:
        return replica_lag_seconds

    def worst_replica(_primary: Connection) -> float | None:
        from workers.db import get_engine

        lags = []
        for url in urls:
            with get_engine(url).connect() as replica:
                lags.append(mysql_replica_lag_seconds(replica))
        return max(lags) if lags else None

    return worst_replica


@dataclass
class Sender:
    """Sends what a window step hands out, cuts walk chunks where the window has room, and logs
    each hold episode once."""

    settings: Settings
    engine: Engine
    tables: Tables
    registry: RunStore
    dispatch: Dispatch

    def send(self, run_id: str, cutoff: str, window: Window, kind: str) -> int:
        for number, rng in window.chunks:
            self.dispatch(run_id, number, rng, cutoff)
        self.registry.confirm(run_id, [number for number, _ in window.chunks])
        sent = len(window.chunks)
        if window.cut_room and kind in CUT_KINDS:
            sent += self.cut_more(run_id, cutoff, window.cut_room)
        if window.new_hold:
            log.warning("cleanup_run_held", run_id=run_id, reason=window.held)
        if window.finished is not None:
            # The run's one finish line first, then the index tidy-up (up to seconds): whoever
            # reads the finished record finds the line already written.
            from workers.coordinator import log_finished

            log_finished(window.finished)
            self.mark_deleted(window.finished)
        return sent

    def mark_deleted(self, record: RunRecord) -> None:
        """The run ended having deleted rows: flag their index entries dead for the next plan
        (expiry.mark_deleted), on PostgreSQL, where they stay until VACUUM; InnoDB purges its
        own and SQLite removes them with the rows. A failure here costs the next plan only."""
        if (record.rows_deleted <= 0 or not record.cutoff
                or self.engine.dialect.name != "postgresql"):
            return
        t0 = time.perf_counter()
        try:
            with self.engine.connect() as conn, conn.begin():
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {MARK_TIMEOUT_MS}")
                expiry.mark_deleted(conn, self.tables, dt.datetime.fromisoformat(record.cutoff))
        except Exception as exc:
            log.warning("index_mark_failed", run_id=record.run_id, error=str(exc))
            return
        log.info("index_marked", run_id=record.run_id, rows=record.rows_deleted,
                 ms=round((time.perf_counter() - t0) * 1000, 1))

    def cut_more(self, run_id: str, cutoff: str, room: int) -> int:
        """Cut up to *room* walk or expiry chunks from the run's cursor and send each
        (compare-and-set on the cursor, so racing processes never cut the same range twice)."""
        sent = 0
        when = dt.datetime.fromisoformat(cutoff)
        with self.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            for _ in range(room * 2):
                if sent >= room:
                    break
                record = self.registry.get(run_id)
                if record is None or record.state != "running" or record.planning_done:
                    break
                rng, next_cursor = cut_next(conn, self.tables, when, record)
                number = self.registry.cut(run_id, record.cursor, rng, next_cursor,
                                           self.settings.max_chunks_in_flight)
                if number == -2:
                    lock_lost(run_id, self.registry, "cut")
                    break
                if number < 0:
                    break  # the window filled meanwhile (another finisher cut into it)
                if number:
                    self.dispatch(run_id, number, rng, cutoff)
                    self.registry.confirm(run_id, [number])
                    sent += 1
        return sent

    def pump(self, run_id: str, *, new_budget: bool = False) -> tuple[RunRecord | None, Window]:
        """Top up *run_id*'s window now; returns the record (None if the run has ended)."""
        record = self.registry.get(run_id)
        if record is None or record.state != "running":
            return record, Window()
        window = self.registry.pump(
            run_id, record.kind, lock_ttl=self.settings.run_timeout_seconds,
            window=self.settings.max_chunks_in_flight, resend_after=resend_after(self.settings),
            gate=gate(self.settings, self.engine, with_lag=True), new_budget=new_budget)
        if window is None:
            return self.registry.get(run_id), Window()
        if window.lost:
            lock_lost(run_id, self.registry, "pump")
            return record, window
        self.send(run_id, record.cutoff, window, record.kind)
        if window.finished is not None:
            return window.finished, window
        return record, window


def lock_lost(run_id: str, registry: RunStore, step: str, **data: object) -> None:
    """A run whose lock no longer names it stops sending: its step was refused, not applied.
    The next trigger that takes the lock ends it (or its own coordinator, redelivered, takes
    the lock back and resumes it)."""
    log.warning("cleanup_run_lock_lost", run_id=run_id, step=step,
                holder=registry.active_run() or "", **data)


def cut_next(conn: Connection, tables: Tables, cutoff: dt.datetime,
             record: RunRecord) -> tuple[ChunkRange, str | None]:
    """The next chunk of a cut kind's run at its cursor, and the cursor after it (None: that
    was the last chunk). An expiry chunk holds at most the run's chunk size, which a lock
    timeout halves; a walk chunk holds the batch size."""
    if record.kind == EXPIRY:
        lo = expiry.decode_key(record.cursor)
        size = 0 if record.batch_size == 0 else record.size
        hi = expiry.cut(conn, tables, cutoff, lo, size)
        return expiry.chunk_range(lo, hi), None if hi is None else expiry.encode_key(hi)
    lo_id = int(record.cursor)
    hi_id, next_lo = walk.cut(conn, tables, cutoff, lo_id, int(record.end), record.batch_size)
    return ChunkRange(WALK, lo_id, hi_id), None if next_lo is None else str(next_lo)


def resend_after(settings: Settings) -> float:
    """A chunk sent this long ago and not finished is sent again: past its hard time limit it
    is no longer running anywhere, and the window keeps queues short, so it is not waiting."""
    return float(settings.chunk_time_limit + 30)


def wait_out_lag(sender: Sender, run_id: str, *, budget: float = 30.0,
                 poll: float = 0.5) -> bool:
    """Poll the replicas' lag for up to *budget* seconds and top up the window once it is under
    the limit. Returns False if the run is still held when the budget runs out."""
    deadline = time.monotonic() + budget
    while True:
        record, window = sender.pump(run_id)
        if record is None or record.ended or not window.held.startswith("replica lag"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
