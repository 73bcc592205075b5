"""A ``db-clean`` run on the workers: plain functions the Celery tasks call (workers.tasks).

- start(): the coordinator. Reads the database's clock once (the archive names' time), resolves
  the tables in Airflow's order, takes the db-clean lock and records the run, then steps it.
- step(): under the run's step mutex, moves the run on: prepares the current table (its report
  count and its archive table, made once, before its first chunk), sends chunks that were lost
  (their worker died: heartbeat gone; or never taken: sent longer ago than the resend period),
  cuts new chunks (``lo`` exclusive, ``hi`` inclusive, by an index probe each, the last one
  open) while the window has room and flow control lets it, and, once a table is cut and its
  window drained, goes on to the next table: the barrier. Every finished chunk, the pump and
  the coordinator ask for a step; a step asked for while another runs is run by that one after
  it.
- run_chunk(): a chunk on a worker: its dependants first (bounded batches), then archive
  and delete in slices sized by time (workers.dbclean.run.move_slices), each one transaction
  that repeats the rule, counted once, then a step. Every transaction's time goes to the run
  store (StoreSizes), where every worker's next slice and batch of that table is sized from.

Redelivery is safe: a chunk's rows, once moved, are gone (the rule is re-checked at delete
time, and PostgreSQL's and MySQL's row locks make a concurrent copy wait and find none), and a
chunk is counted once (workers.dbclean.store).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import structlog
from sqlalchemy import Column, Connection, Engine, MetaData, Table, inspect
from sqlalchemy.exc import DBAPIError, OperationalError

from workers.chunk import heartbeat
from workers.db import db_now, set_timeouts
from workers.dbclean import cascade, run
from workers.dbclean import statements as sql
from workers.dbclean.rules import TableRule, effective_tables
from workers.dbclean.store import DbCleanStore, decode_key, encode_key, payload
from workers.runs import RunStore
from workers.settings import Settings
from workers.window import gate, resend_after

log = structlog.get_logger("statesweep.dbclean")

#: Sends one chunk message: (run_id, chunk number, table, lo, hi) with lo/hi encoded keys.
SendChunk = Callable[[str, int, str, str | None, str | None], None]


def encode_request(request: run.Request) -> str:
    d = asdict(request)
    d["before"] = request.before.isoformat()
    return json.dumps(d)


def decode_request(text: str) -> run.Request:
    d = json.loads(text)
    d["before"] = dt.datetime.fromisoformat(d["before"])
    for name in ("tables", "dag_ids", "exclude_dag_ids"):
        d[name] = tuple(d[name])
    return run.Request(**d)


@dataclass
class StoreSizes:
    """A run's tables' timings in the run store (workers.dbclean.run.Sizer), shared by every
    worker: each times its transactions there and sizes its next one of a table from them."""

    store: DbCleanStore
    run_id: str
    batch_size: int
    target_ms: int

    def recent(self, table: str) -> list[run.Timing]:
        return [run.Timing(*t) for t in self.store.timings(self.run_id, table)]

    def size(self, table: str) -> int:
        return run.next_size(self.batch_size, self.target_ms, self.recent(table))

    def note(self, table: str, timing: run.Timing, evidence: bool | None = None) -> None:
        # One that is no evidence of its rows' speed is still the table's longest, for status.
        self.store.note_timing(self.run_id, table, timing.planned, timing.rows, timing.seconds,
                               timing.lock_timeout, run.SIZING_WINDOW,
                               evidence=run.is_evidence(timing) if evidence is None
                               else evidence)


def sizes_for(store: DbCleanStore, run_id: str, request: run.Request) -> StoreSizes:
    return StoreSizes(store, run_id, request.batch_size, request.target_ms)


@dataclass
class Context:
    settings: Settings
    engine: Engine
    registry: RunStore
    send: SendChunk
    #: Set in a chunk task: a table's start (a count, an archive) is left to a pump task, whose
    #: time limit is made for it, rather than done inside the chunk's.
    pump: Callable[[str], None] | None = None
    #: Where a chunk's transactions are timed and sized (a test gives its own clock).
    sizer: Callable[[DbCleanStore, str, run.Request], StoreSizes] = sizes_for

    @property
    def store(self) -> DbCleanStore:
        return DbCleanStore(self.registry)


def start(ctx: Context, run_id: str, request: run.Request, source: str) -> dict[str, Any]:
    """Record and start the run (a redelivered coordinator resumes its own); one at a time."""
    version, rules = run.plan(ctx.engine, request)
    with ctx.engine.connect() as conn:
        tag = run.run_tag(db_now(conn))
    names = [r.table for r in rules]
    outcome, detail = ctx.store.start(
        run_id, ttl=ctx.settings.run_timeout_seconds, source=source,
        before=request.before.isoformat(), batch_size=request.batch_size,
        request=encode_request(request), version=version, tables=names, tag=tag)
    if outcome == "held":
        why = f"db-clean run {detail} is active"
        ctx.registry.close_queued(run_id, why)
        ctx.registry.note_trigger("skipped", run_id, source, why)
        log.info("db_clean_skipped_active_run", run_id=run_id, active_run_id=detail)
        return {"run_id": run_id, "status": "skipped", "active_run_id": detail, "reason": why}
    if outcome == "ended":
        return {"run_id": run_id, "status": "skipped", "reason": f"run {run_id} is {detail}"}
    if outcome == "started":
        ctx.registry.note_trigger("started", run_id, source)
        log.info("db_clean_run_started", run_id=run_id, airflow=version, tables=names,
                 before=request.before.isoformat(), batch_size=request.batch_size,
                 skip_archive=request.skip_archive)
    _step_quietly(ctx, run_id)
    return {"run_id": run_id, "status": "started" if outcome == "started" else "resumed",
            "airflow": version, "tables": names}


def _step_quietly(ctx: Context, run_id: str) -> None:
    """A step after the caller's own work is done (the run started, a chunk counted): one that
    fails (the database away) is logged and left to the next step, the pump's."""
    try:
        step(ctx, run_id)
    except Exception as exc:
        log.warning("db_clean_step_failed", run_id=run_id, error=f"{type(exc).__name__}: "
                    f"{' '.join(str(exc).split())[:300]}")


def step(ctx: Context, run_id: str) -> None:
    """Move the run on, once (or again, for each step asked for meanwhile)."""
    store = ctx.store
    store.ask_step(run_id)
    while True:
        token = store.try_step(run_id)
        if token is None:
            return  # the holder runs the step asked for when it is done
        try:
            store.take_ask(run_id)
            _step(ctx, store, run_id)
        finally:
            store.end_step(run_id, token)
        if not store.take_ask(run_id):
            return
        store.ask_step(run_id)


def _step(ctx: Context, store: DbCleanStore, run_id: str) -> None:
    record = ctx.registry.get(run_id)
    meta = store.meta(run_id)
    if record is None or not meta:
        return
    if record.state != "running":
        store.end(run_id, record.state)  # aborted: free the lock, drop the window
        return
    if not store.renew(run_id, ctx.settings.run_timeout_seconds):
        log.warning("db_clean_lock_lost", run_id=run_id, holder=store.active_run() or "")
        return
    request = decode_request(meta["request"])
    rules = {r.table: r for r in effective_tables(meta["version"], request.tables)}
    names: list[str] = json.loads(meta["tables"])
    index = int(meta.get("index") or 0)
    while index < len(names):
        name = names[index]
        table = store.table(run_id, name)
        if not table.get("state"):
            if ctx.pump is not None:
                ctx.pump(run_id)
                return
            try:
                table = _prepare(ctx, store, run_id, rules[name], request, meta["tag"])
            except DBAPIError as exc:
                if exc.connection_invalidated:
                    raise  # the database went away: the next step tries again
                # As --local: a table that cannot be started (its archive refused) is reported
                # failed and the next one runs.
                error = " ".join(str(exc.orig or exc).split())[:500]
                store.set_table(run_id, name, state="done", failed=error)
                log.warning("db_clean_table_failed", run_id=run_id, table=name, error=error)
                table = store.table(run_id, name)
        if table["state"] == "running" and not _advance_table(ctx, store, run_id, rules[name],
                                                              request, table):
            return
        index += 1
        store.client.hset(store.meta_key(run_id), "index", index)
    reports = store.tables(run_id)
    failed = [t for t in reports if t["failed"]]
    error = "; ".join(f"{t['table']}: {t['failed']}" for t in failed)
    state = "failed" if failed else "finished"
    if store.end(run_id, state, f"{len(failed)} table(s) failed: {error}" if failed else ""):
        ended = ctx.registry.get(run_id)
        log.info("db_clean_run_finished", run_id=run_id, state=state,
                 rows=ended.rows_deleted if ended else 0,
                 chunks=ended.chunks_done if ended else 0, tables_failed=len(failed))


def _prepare(ctx: Context, store: DbCleanStore, run_id: str, rule: TableRule,
             request: run.Request, tag: str) -> dict[str, str]:
    """A table's start: its count and archive (once), or why it is skipped."""
    live = set(inspect(ctx.engine).get_table_names())
    filtered = bool(request.dag_ids or request.exclude_dag_ids)
    done: dict[str, Any] = {}
    if rule.table not in live:
        done = {"state": "skipped", "skipped": "not in this database"}
    else:
        # Closed before the count, which runs on a connection of its own: this one's
        # transaction (the catalog reads) is not left open, idle, for as long as the count.
        with _autocommit(ctx.engine) as conn:
            t = sql.reflect(conn, rule.table)
        missing = sql.missing_columns(rule, t, filtered)
        if missing:
            done = {"state": "skipped",
                    "skipped": f"its rule needs {', '.join(missing)}, which {rule.table} "
                               "lacks"}
        elif not sql.key_columns(t):
            done = {"state": "skipped", "skipped": "it has no primary key to cut chunks by"}
        else:
            eligible = _count(ctx, rule, t, request)
            done = {"eligible": max(eligible, 0),
                    "state": "running" if eligible else "done"}
    if done.get("state") == "running" and not request.skip_archive:
        archive = store.table(run_id, rule.table).get("archive")
        if not archive:  # named before it is made: a step that dies between makes it next
            archive = run._archive_name(tag, rule.table, live)
            store.set_table(run_id, rule.table, archive=archive)
        if archive not in live:
            with ctx.engine.begin() as conn:
                sql.create_archive(conn, sql.reflect(conn, rule.table), archive)
            log.info("db_clean_archive_created", run_id=run_id, table=rule.table,
                     archive=archive)
    if done.get("skipped"):
        log.warning("db_clean_table_skipped", run_id=run_id, table=rule.table,
                    reason=done["skipped"])
    store.set_table(run_id, rule.table, **done)
    return store.table(run_id, rule.table)


#: How often a chunk is sent again before its table fails.
MAX_RESENDS = 5
#: The longest a table's report count may take; past it the count is left unknown (the chunks
#: find the rows all the same).
COUNT_TIMEOUT_MS = 30_000


def _count(ctx: Context, rule: TableRule, t: Table, request: run.Request) -> int:
    """The table's eligible rows, for its report; -1 if the count took too long."""
    try:
        with ctx.engine.begin() as conn:
            set_timeouts(conn, request.lock_timeout_ms, COUNT_TIMEOUT_MS)
            return sql.count(conn, t, _eligible(conn, rule, t, request))
    except OperationalError as exc:
        log.warning("db_clean_count_skipped", table=rule.table,
                    error=type(exc.orig or exc).__name__)
        return -1


def _eligible(conn: Any, rule: TableRule, t: Table, request: run.Request) -> list[Any]:
    return sql.eligible(conn, rule, t, request.before, request.dag_ids,
                        request.exclude_dag_ids, request.protect_unfinished)


def _advance_table(ctx: Context, store: DbCleanStore, run_id: str, rule: TableRule,
                   request: run.Request, table: dict[str, str]) -> bool:
    """Resend lost chunks and cut new ones; True once the table is cut and drained."""
    window = store.window(run_id)
    cut_done = table.get("cut") == "1" or bool(table.get("failed"))
    if not window and cut_done:
        store.set_table(run_id, rule.table, state="done")
        log.info("db_clean_table_done", run_id=run_id, table=rule.table,
                 rows=int(table.get("deleted") or 0), failed=table.get("failed", ""))
        return True
    held = _held(ctx)
    _note_held(ctx, store, run_id, held)
    if held:
        return False
    now = time.time()
    late = resend_after(ctx.settings)
    for number, st, sent_at, resends, body in window:
        lost = (st == "t" and not store.alive(run_id, number)) or \
            (st == "s" and now - sent_at > late)
        if lost and resends >= MAX_RESENDS:
            # Sent that often and never finished (its worker dies on it, or its time limit cuts
            # it short each time): its table fails rather than the run going round for ever.
            name = json.loads(body)[0]
            error = f"chunk {number} was sent {resends + 1} times and never finished"
            if store.finish(run_id, number, name, 0, 0, error):
                log.warning("db_clean_table_failed", run_id=run_id, table=name, chunk=number,
                            error=error)
            continue
        if lost:
            name, lo, hi = json.loads(body)
            store.put(run_id, number, body, resends + 1)
            store.client.hincrby(store.run_key(run_id), "resends", 1)
            log.warning("db_clean_chunk_resent", run_id=run_id, chunk=number, table=name,
                        was="running" if st == "t" else "sent")
            ctx.send(run_id, number, name, lo, hi)
    room = ctx.settings.max_chunks_in_flight - len(window)
    if cut_done or room <= 0:
        return False
    with ctx.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        # Every step (one after each chunk) cuts here: the table is read from the catalog once
        # per process and run, not once per step.
        t = _cached(run_id, f"{rule.table}:cut", lambda: sql.reflect(conn, rule.table))
        cond = _eligible(conn, rule, t, request)
        lo_text = table.get("cursor") or None
        eligible = int(table.get("eligible") or 0)
        size = even_chunk(request.batch_size, eligible)
        cuts = int(table.get("cuts") or 0)
        for _ in range(room):
            cuts += 1
            hi = sql.next_bound(conn, t, cond, decode_key(lo_text), size)
            if hi is not None and 0 < eligible <= cuts * size and \
                    sql.next_bound(conn, t, cond, hi, 1) is None:
                # The count's last chunk, and no eligible row after it: it runs open to the
                # table's end (cut at its last row, it would leave one more chunk, empty, to
                # send and run). Rows that became eligible since the count are cut as any.
                hi = None
            hi_text = encode_key(hi)
            number = store.next_number(run_id)
            body = payload(rule.table, lo_text, hi_text)
            store.put(run_id, number, body)
            store.set_table(run_id, rule.table, cursor=hi_text or "", cuts=cuts,
                            cut="1" if hi is None else "0")
            ctx.send(run_id, number, rule.table, lo_text, hi_text)
            if hi is None:
                break
            lo_text = hi_text
    return False


def even_chunk(batch_size: int, eligible: int) -> int:
    """Rows per chunk of a table with *eligible* rows (its count at the table's start; 0:
    unknown): as few chunks as --batch-size allows, of even size, so the workers that take a
    table's chunks finish it together (dag_run's 14,690 rows were a chunk of 10,000 and one of
    4,690: one worker waited a second for the other). Never above *batch_size*; 0 (one chunk
    per table) stays 0."""
    if batch_size <= 0 or eligible <= batch_size:
        return batch_size
    chunks = -(-eligible // batch_size)
    return -(-eligible // chunks)


def _held(ctx: Context) -> str:
    """Why no chunk may be sent now: paused, outside active hours, replicas lagging."""
    paused = ctx.registry.paused()
    if paused is not None:
        return f"paused by {paused.by or 'someone'}: {paused.reason or '-'}"
    return gate(ctx.settings, ctx.engine, with_lag=True).external


def _note_held(ctx: Context, store: DbCleanStore, run_id: str, held: str) -> None:
    key = store.run_key(run_id)
    was = str(store.client.hget(key, "held") or "")
    if held == was:
        return
    if held:
        store.client.hset(key, mapping={"held": held, "held_since": time.time()})
        store.client.hincrby(key, "holds", 1)
        log.warning("db_clean_run_held", run_id=run_id, reason=held)
    else:
        store.client.hset(key, mapping={"held": "", "held_since": 0})


def _autocommit(engine: Engine) -> Connection:
    """A connection whose reads are each their own transaction (use it in ``with``)."""
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


# --- a chunk ------------------------------------------------------------------------------------

_schema: dict[tuple[str, str], Any] = {}


def _cached(run_id: str, name: str, make: Callable[[], Any]) -> Any:
    """Per process and run: reflected tables and the foreign keys (one catalog read each)."""
    key = (run_id, name)
    if key not in _schema:
        if len(_schema) > 64:
            _schema.clear()
        _schema[key] = make()
    return _schema[key]


@dataclass(frozen=True)
class ChunkOutcome:
    status: str  # moved | ended | duplicate | forged | failed
    rows: int = 0
    dependants: int = 0


def run_chunk(ctx: Context, run_id: str, chunk: int, table: str, lo: str | None,
              hi: str | None) -> ChunkOutcome:
    """Move one chunk (its dependants first), count it once, and step the run. A database
    error that is not worth a retry fails the chunk's table (recorded; its other chunks drain
    and the next table runs); transient ones propagate for the task to retry."""
    store = ctx.store
    status = store.begin(run_id, chunk, payload(table, lo, hi))
    if status != "ok":
        log.info("db_clean_chunk_skipped", run_id=run_id, chunk=chunk, status=status)
        return ChunkOutcome(status)
    meta = store.meta(run_id)
    request = decode_request(meta["request"])
    rule = {r.table: r for r in effective_tables(meta["version"], request.tables)}[table]
    archive_name = store.table(run_id, table).get("archive") or None
    t0 = time.monotonic()
    with heartbeat(ctx.registry, run_id, chunk):
        rows, deps, slices = _move(ctx, run_id, rule, request, archive_name, decode_key(lo),
                                   decode_key(hi), meta["version"])
    counted = store.finish(run_id, chunk, table, rows, deps)
    log.info("db_clean_chunk_moved", run_id=run_id, chunk=chunk, table=table, lo=lo, hi=hi,
             rows=rows, dependants=deps, counted=counted, transactions=slices,
             ms=round((time.monotonic() - t0) * 1000, 1))
    _step_quietly(ctx, run_id)
    return ChunkOutcome("moved", rows, deps)


def fail_chunk(ctx: Context, run_id: str, chunk: int, table: str, error: str) -> None:
    """A chunk that failed for good: its table is reported failed, the run goes on."""
    if ctx.store.finish(run_id, chunk, table, 0, 0, error or "failed"):
        log.warning("db_clean_table_failed", run_id=run_id, table=table, chunk=chunk,
                    error=error)
    _step_quietly(ctx, run_id)


def requeue(ctx: Context, run_id: str, chunk: int, error: str) -> None:
    ctx.store.requeue(run_id, chunk, error)


def _move(ctx: Context, run_id: str, rule: TableRule, request: run.Request,
          archive_name: str | None, lo: sql.Key | None,
          hi: sql.Key | None, version: str) -> tuple[int, int, int]:
    """(rows moved, dependants deleted, transactions of the move)."""
    engine = ctx.engine
    sizes = ctx.sizer(ctx.store, run_id, request)

    def reflect() -> tuple[Table, list[run.Dependant]]:
        # Autocommit: the catalog reads (a few dozen under a parent's cascade tree) are each a
        # statement of their own, not one read-only transaction left open across them.
        with _autocommit(engine) as conn:
            fks = _cached(run_id, "", lambda: cascade.ForeignKeys(conn))
            t = sql.reflect(conn, rule.table)
            return t, run._dependants(conn, fks, t)

    t, dependants = _cached(run_id, rule.table, reflect)
    archive = None
    if archive_name:
        # The archive's columns are the table's (create_archive made it so): no reflection.
        archive = Table(archive_name, MetaData(),
                        *[Column(c.name, c.type, nullable=True) for c in t.c])
    with _autocommit(engine) as conn:
        cond = _eligible(conn, rule, t, request)
    deps = 0
    if dependants:
        # The dependant tables' archives for the rows Airflow archives with the cascade:
        # made, or found, once per process and run.
        cascades = {} if archive_name is None else _cached(
            run_id, f"cascades:{rule.table}", lambda: cascade.cascade_archives(
                engine, version, rule.table, archive_name, [d[1] for d in dependants]))
        deps = run._delete_dependants(engine, request,
                                      run.pre_deleted(rule, dependants, cascades), t,
                                      [*cond, *sql.in_range(t, lo, hi)], sizes, cascades)
    # Slices of the chunk, each one transaction: its archive and its delete, the whole rule
    # re-checked.
    rows, slices = run.move_slices(engine, request, t, archive, cond, lo, hi, sizes)
    return rows, deps, slices
