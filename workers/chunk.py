"""One chunk: checked against its run's window, deleted in its own transaction, counted once,
and the window topped up in the same step. The Celery task and ``cleanup --local`` call these.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, text

from workers import cleanup
from workers.cleanup import EVERYTHING
from workers.coordinator import RunSummary, check_run_id, coordinate
from workers.exceptions import InvalidArgument, NotFound
from workers.flow.sizing import ChunkTiming, SizingPolicy
from workers.planners import BLOCKS, CUT_KINDS, DAGS, EXPIRY, KINDS, ChunkRange
from workers.planners.blocks import MAX_PAGES_PER_CHUNK
from workers.planners.ids import MAX_BATCHES_PER_CHUNK
from workers.runs import BEAT_EVERY_SECONDS, Gate, RunStore
from workers.schema import Tables
from workers.selection import Selection
from workers.settings import Settings
from workers.window import (
    Dispatch,
    Sender,
    gate,
    lag_reader,
    lag_reason,
    lock_lost,
    resend_after,
)

log = structlog.get_logger("statesweep.chunk")


@dataclass(frozen=True)
class ChunkArgs:
    run_id: str
    chunk: int
    range: ChunkRange
    cutoff: dt.datetime
    cutoff_text: str


def _whole(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise InvalidArgument(f"{name} must be at least {minimum}, got {value}")
    return value


def check_chunk_args(run_id: Any, chunk: Any, kind: Any, lo: Any, hi: Any,
                     cutoff: Any, lo_id: Any = 0, hi_id: Any = 0) -> ChunkArgs:
    """Validate a chunk message before touching the database; raises InvalidArgument."""
    check_run_id(run_id)
    _whole("chunk", chunk, minimum=1)
    if kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == EXPIRY:
        # Keys: expires_at in microseconds since the epoch (any whole number), and an id.
        _whole("lo", lo, minimum=-(2 ** 62))
        _whole("lo_id", lo_id, minimum=0)
        _whole("hi_id", hi_id, minimum=0)
        if hi is not None and (_whole("hi", hi, minimum=-(2 ** 62)), hi_id) <= (lo, lo_id):
            raise InvalidArgument(f"hi must be above lo, got lo={lo}.{lo_id} hi={hi}.{hi_id}")
    else:
        _whole("lo", lo, minimum=0)
        if hi is not None and _whole("hi", hi, minimum=0) <= lo:
            raise InvalidArgument(f"hi must be above lo, got lo={lo} hi={hi}")
        if lo_id or hi_id:
            raise InvalidArgument(f"lo_id and hi_id belong to expiry ranges, not {kind!r}")
    if hi is None and kind not in (BLOCKS, EXPIRY):
        raise InvalidArgument(
            f"only a blocks or expiry range may be open-ended (hi null), got {kind!r}")
    if not isinstance(cutoff, str):
        raise InvalidArgument(f"cutoff must be an ISO-8601 string, got {cutoff!r}")
    try:
        when = dt.datetime.fromisoformat(cutoff)
    except ValueError:
        raise InvalidArgument(f"cutoff is not an ISO-8601 timestamp: {cutoff!r}") from None
    if when.tzinfo is None:
        raise InvalidArgument(f"cutoff must carry a UTC offset, got {cutoff!r}")
    return ChunkArgs(run_id, chunk, ChunkRange(kind, lo, hi, lo_id, hi_id),
                     when.astimezone(dt.UTC), cutoff)


class ProgressNotRecorded(Exception):
    """The chunk's rows were deleted and committed, but the run store could not count them."""

    def __init__(self, rows: int) -> None:
        super().__init__(f"{rows} rows deleted but not yet counted")
        self.rows = rows


@dataclass(frozen=True)
class ChunkResult:
    rows: int
    status: str  # deleted | duplicate | ended | held | lost
    counted: bool = False


def next_size(settings: Settings, kind: str, size: int, batch: int, rows: int, units: int,
              seconds: float, max_size: int = 0) -> int:
    """Units (pages or ids) for the chunks cut next, from what this one measured; 0 = keep.

    With STATESWEEP_TARGET_CHUNK_SECONDS, sized to take about that long; otherwise so that a
    chunk deletes about ``batch`` rows where this one found ``rows`` in ``units``. Growth is at
    most 1.2x a step; the planner's cap bounds a chunk's scan where expired rows are sparse, and
    *max_size* (the plan's) its rows where they are dense: a run of empty chunks (a previous
    run's empty pages) cannot grow the next one past twice the batch.
    """
    if kind in CUT_KINDS or batch == 0 or size <= 0:
        return 0
    cap = MAX_PAGES_PER_CHUNK if kind == BLOCKS else max(1000, batch * MAX_BATCHES_PER_CHUNK)
    if kind == DAGS and max_size > 0:
        # A dags chunk's DELETE reads the selected dags' rows from the dag_id index however
        # many ids it spans: only the plan's bound on its rows holds it.
        cap = max_size
    elif max_size > 0:
        cap = min(cap, max_size)
    if settings.target_chunk_seconds:
        # Bounds in the plan's own unit (pages or ids): at least one, at most the planner's
        # cap, which keeps any one chunk's scan short wherever expired rows are sparse.
        policy = SizingPolicy(settings.target_chunk_seconds, minimum=1, maximum=cap)
        return policy.next_size(size, [ChunkTiming(units, seconds)])
    ideal = math.ceil(batch * units / rows) if rows > 0 else cap
    return max(1, min(cap, ideal, math.ceil(size * 1.2)))


def run_chunk(settings: Settings, engine: Engine, tables: Tables, registry: RunStore,
              dispatch: Dispatch, args: ChunkArgs, *, carried_rows: int = 0,
              on_held: Callable[[str], None] | None = None) -> ChunkResult:
    """Delete one chunk, count it once, top up the window, finish the run if it was the last.

    A chunk whose run is held (paused, outside active hours, past its budget, replicas lagging)
    deletes nothing and is parked in the window, to be sent again when the hold lifts; *on_held*
    is told why (the Celery task schedules a pump for holds that lift by themselves).
    """
    if settings.chunk_rate_limit:
        time.sleep(registry.rate_slot(settings.chunk_rate_per_second))
    g = gate(settings)
    status, detail = registry.begin_chunk(args.run_id, args.chunk, args.range, g)
    bound = log.bind(run_id=args.run_id, chunk=args.chunk)
    if status == "unknown":
        raise NotFound(f"unknown run id {args.run_id!r}: no such cleanup run is recorded")
    if status == "forged":
        planned = detail[0] if detail else "never planned"
        raise InvalidArgument(
            f"chunk {args.chunk} ({args.range.kind} {args.range.encode()}) is not in run "
            f"{args.run_id}'s plan (planned: {planned}); nothing deleted")
    if status in ("duplicate", "ended"):
        bound.info("chunk_skipped", reason="already counted" if status == "duplicate"
                   else f"run {detail[0]}")
        adopted = CommitNotes(registry, args, engine.dialect.name)
        found = registry.commit_notes(args.run_id, args.chunk) if adopted.enabled else {}
        if found:
            with engine.connect() as conn:
                adopted.settle(conn, found)
        if carried_rows or adopted.rows:
            # Another copy of this chunk was counted first; the rows this one deleted (and
            # could not count before), or a dead copy committed, are still the run's: FINISH
            # adds them, uncounted.
            _count_carried(settings, tables, registry, args, carried_rows + adopted.rows, g,
                           adopted.names)
        return ChunkResult(carried_rows, status)
    if status == "lost":
        # The run's lock lapsed or passed on: this chunk deletes nothing and counts nothing.
        lock_lost(args.run_id, registry, "begin", chunk=args.chunk, carried_rows=carried_rows)
        return ChunkResult(carried_rows, "lost")
    if status == "held":
        reason, new_episode = str(detail[0]), bool(detail[1])
        if new_episode:
            bound.warning("cleanup_run_held", reason=reason)
        if on_held is not None:
            on_held(reason)
        return ChunkResult(carried_rows, "held")
    cutoff_text, size, batch = str(detail[0]), int(detail[1]), int(detail[2])
    max_size = int(detail[3] or 0) if len(detail) > 3 else 0
    selection = Selection.decode(str(detail[4])) if len(detail) > 4 else EVERYTHING
    if dt.datetime.fromisoformat(cutoff_text) != args.cutoff:
        raise InvalidArgument(
            f"cutoff {args.cutoff.isoformat()} is not run {args.run_id}'s cutoff {cutoff_text}")

    with heartbeat(registry, args.run_id, args.chunk):
        return _delete_and_count(settings, engine, tables, registry, dispatch, args, g, size,
                                 batch, max_size, selection, carried_rows, on_held)


@contextmanager
def heartbeat(registry: RunStore, run_id: str, chunk: int) -> Iterator[None]:
    """Renew the chunk's heartbeat while it runs, from a thread (the DELETE blocks this one):
    a worker killed mid-chunk stops beating, and its chunk is sent again within seconds, while
    a live chunk, however long, never is."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT_EVERY_SECONDS):
            try:
                registry.beat(run_id, chunk)
            except Exception:  # the run store is away: at worst the chunk is sent again
                log.warning("chunk_heartbeat_missed", run_id=run_id, chunk=chunk)

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id}-{chunk}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _delete_and_count(settings: Settings, engine: Engine, tables: Tables, registry: RunStore,
                      dispatch: Dispatch, args: ChunkArgs, g: Gate, size: int, batch: int,
                      max_size: int, selection: Selection, carried_rows: int,
                      on_held: Callable[[str], None] | None) -> ChunkResult:
    bound = log.bind(run_id=args.run_id, chunk=args.chunk)
    t0 = time.perf_counter()
    notes = CommitNotes(registry, args, engine.dialect.name)
    try:
        rows = cleanup.delete_range(
            engine, tables, args.range, args.cutoff, lock_timeout_ms=settings.lock_timeout_ms,
            statement_timeout_ms=settings.statement_timeout_ms,
            max_lag_seconds=settings.max_replica_lag_seconds or None,
            read_lag=lag_reader(settings) if settings.max_replica_lag_seconds else None,
            protect=settings.protect_unfinished_dag_runs, selection=selection,
            before_commit=notes.before_commit)
    except cleanup.ReplicaLagging as exc:
        reason = lag_reason(exc.lag, settings.max_replica_lag_seconds)
        if registry.park(args.run_id, args.chunk, reason):
            bound.warning("cleanup_run_held", reason=reason)
        if on_held is not None:
            on_held(reason)
        return ChunkResult(carried_rows, "held")
    seconds = time.perf_counter() - t0
    # Units the chunk spanned, for sizing arithmetic chunks; a cut kind's chunk is sized in
    # rows by its cut.
    units = (rows if args.range.kind in CUT_KINDS else size if args.range.hi is None
             else args.range.hi - args.range.lo)
    resize = next_size(settings, args.range.kind, size, batch, rows, units, seconds, max_size)
    deleted = rows
    rows += carried_rows + notes.rows
    try:
        counted, window = registry.finish_chunk(
            args.run_id, args.chunk, args.range.kind, rows, units,
            lock_ttl=settings.run_timeout_seconds, window=settings.max_chunks_in_flight,
            resend_after=resend_after(settings), gate=g, new_size=resize, seconds=seconds,
            table=tables.task_state.name, notes=notes.names)
    except Exception as exc:
        # Rows in commit notes stay there for the retry to count (or were counted, if FINISH
        # was applied and only its reply lost): only the rest is carried.
        raise ProgressNotRecorded(rows - notes.noted_rows) from exc
    if window.lost:
        # Deleted (each row once, by the predicate), but the run lost its lock meanwhile: its
        # count is refused; the rows are in this line, and the next run finds them gone.
        lock_lost(args.run_id, registry, "finish", chunk=args.chunk, rows=rows)
        return ChunkResult(rows, "lost")
    # The rows this step counted: a commit note another copy counted first is not counted
    # again (nor logged again: the lines' rows sum to the run's).
    rows = window.counted_rows
    bound.info("chunk_deleted", kind=args.range.kind, range=args.range.encode(),
               rows=rows, ms=round(seconds * 1000, 1), counted=counted,
               **({"deleted": deleted} if deleted != rows else {}))
    Sender(settings, engine, tables, registry, dispatch).send(  # logs the finish, if it is one
        args.run_id, args.cutoff_text, window, args.range.kind)
    return ChunkResult(rows, "deleted", counted)


class CommitNotes:
    """Counts a chunk's committed DELETE exactly once on PostgreSQL, even when the process
    that committed it dies before its FINISH (the count is in Redis, the rows in the database:
    no one transaction holds both). Just before the COMMIT, the transaction's id and rows are
    noted in the run store; the FINISH that counts them removes the note. A copy of the chunk
    (sent again once the dead worker's heartbeat lapsed) finds notes left by others after its
    own DELETE, which waited on their row locks: it counts those whose transaction committed
    (txid_status) with its own and drops those that rolled back. Other databases keep no
    notes: there a worker killed between COMMIT and FINISH leaves the run's count short by
    its chunk (never the data)."""

    def __init__(self, registry: RunStore, args: ChunkArgs, dialect: str) -> None:
        self.registry, self.args = registry, args
        self.enabled = dialect == "postgresql"
        self.own: list[str] = []
        self.adopted: dict[str, int] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.own, *self.adopted)

    @property
    def rows(self) -> int:
        """Rows of other copies' committed DELETEs, counted with this chunk."""
        return sum(self.adopted.values())

    @property
    def noted_rows(self) -> int:
        return sum(int(n.rsplit(":", 1)[1]) for n in self.own) + self.rows

    def before_commit(self, conn: Connection, rows: int, xid: int | None) -> None:
        """Note this transaction's *rows* under its id, *xid*, which workers.db.begin_chunk
        reads on PostgreSQL (the only database that keeps notes) with the chunk's first
        statement."""
        if not self.enabled:
            return
        found = None
        if rows > 0:
            assert xid is not None, "begin_chunk reads a PostgreSQL chunk's transaction id"
            note, found = self.registry.note_commit(self.args.run_id, self.args.chunk, xid, rows)
            self.own.append(note)
        self.settle(conn, found)

    def settle(self, conn: Connection, found: dict[str, int] | None = None) -> None:
        """Adopt the committed notes of other copies (*found*, or read now); drop those that
        rolled back."""
        if not self.enabled:
            return
        if found is None:
            found = self.registry.commit_notes(self.args.run_id, self.args.chunk)
        for note, rows in found.items():
            if note in self.own or note in self.adopted:
                continue
            status = conn.execute(text("SELECT txid_status(:xid)"),
                                  {"xid": int(note.split(":", 1)[0])}).scalar()
            if status == "committed":
                self.adopted[note] = rows
            elif status != "in progress":  # rolled back, or too old to tell: nothing deleted
                self.registry.drop_note(self.args.run_id, self.args.chunk, note)
        if self.adopted:
            log.info("chunk_commit_adopted", run_id=self.args.run_id, chunk=self.args.chunk,
                     rows=self.rows, notes=len(self.adopted))


def _count_carried(settings: Settings, tables: Tables, registry: RunStore, args: ChunkArgs,
                   rows: int, g: Gate, notes: tuple[str, ...] = ()) -> None:
    try:
        _, window = registry.finish_chunk(
            args.run_id, args.chunk, args.range.kind, rows, 0,
            lock_ttl=settings.run_timeout_seconds, window=settings.max_chunks_in_flight,
            resend_after=resend_after(settings), gate=g, table=tables.task_state.name,
            notes=notes)
        rows = window.counted_rows
    except Exception as exc:  # noted rows stay in their notes for the retry to count
        raise ProgressNotRecorded(rows - sum(int(n.rsplit(":", 1)[1]) for n in notes)) from exc
    log.info("chunk_rows_carried", run_id=args.run_id, chunk=args.chunk, rows=rows)


#: How often ``cleanup --local`` retries a chunk that hit its lock timeout, shrinking the
#: chunks cut after it each time (as the Celery task does), before the run fails.
LOCAL_LOCK_RETRIES = 5


def _is_lock_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "lock timeout" in text or "lock wait timeout" in text


def run_local(settings: Settings, engine: Engine, tables: Tables, registry: RunStore, *,
              batch_size: int | None = None, source: str = "local",
              selection: Selection = EVERYTHING,
              on_chunk: Callable[[int, ChunkRange, int], None] | None = None) -> RunSummary:
    """Plan and delete in this process, chunk by chunk, each committed on its own (for cron
    users and small databases: no broker needed). The window's sends go to a local queue.

    Another active run is left alone (skipped, naming it): a local run never takes another
    process's chunks. A chunk that hits its lock timeout is retried, the chunks cut after it
    halved (registry.shrink); a run that stops any other way (an error, Ctrl-C, retries used
    up) is failed and its lock freed before the error propagates, so the next cron run is not
    refused for an hour."""
    from sqlalchemy.exc import OperationalError

    queue: deque[tuple[str, int, ChunkRange, str]] = deque()

    def dispatch(run_id: str, number: int, rng: ChunkRange, cutoff: str) -> None:
        queue.append((run_id, number, rng, cutoff))

    from workers.identity import read_identity

    with engine.connect() as conn:  # recorded in the run, as a worker's coordinator does
        database = str(read_identity(conn, tables.naming))
    summary = coordinate(settings, engine, tables, registry, dispatch, batch_size=batch_size,
                         source=source, selection=selection, top_up_active=False,
                         database=database)
    if summary.status not in ("started", "finished", "resumed"):
        return summary
    run_id = summary.run_id
    bound = log.bind(run_id=run_id, source=source)
    retries: dict[int, int] = {}
    try:
        while queue:
            _, number, rng, cutoff = queue.popleft()
            args = check_chunk_args(run_id, number, rng.kind, rng.lo, rng.hi, cutoff,
                                    rng.lo_id, rng.hi_id)
            try:
                result = run_chunk(settings, engine, tables, registry, dispatch, args)
            except OperationalError as exc:
                tried = retries.get(number, 0)
                if not _is_lock_timeout(exc) or tried >= LOCAL_LOCK_RETRIES:
                    raise
                retries[number] = tried + 1
                registry.shrink(run_id)
                registry.requeue(run_id, number)
                bound.warning("chunk_retry", chunk=number, error=type(exc).__name__,
                              reason="lock timeout", retries=tried)
                # Back off a little; the rest of the window goes first.
                time.sleep(min(5.0, 0.1 * 2 ** tried))
                queue.append((run_id, number, rng, cutoff))
                continue
            if on_chunk is not None and result.status == "deleted":
                on_chunk(number, rng, result.rows)
    except BaseException as exc:
        _end_local_run(registry, run_id, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        record = registry.get(run_id)
        if record is not None and record.ended:
            registry.release(run_id)  # ended runs free their lock themselves; make certain
    record = registry.get(run_id)
    if record is not None and not record.ended:
        # Its chunks were parked (paused, outside active hours, past its budget) and nothing
        # else drives a local run: end it and free the lock; the next run deletes the rest.
        _end_local_run(registry, run_id, f"the local run stopped while held "
                                         f"({record.held or 'held'}); the next run goes on")
    return summary


def _end_local_run(registry: RunStore, run_id: str, error: str) -> None:
    """Fail a local run this process started (compare-and-set: only while its lock names it
    or has lapsed), which frees its lock in the same step."""
    state = registry.fail(run_id, error, started=True)
    if state == "failed":
        log.error("cleanup_run_failed", run_id=run_id, error=error)
    else:
        log.warning("cleanup_run_fail_refused", run_id=run_id, state=state, error=error)
