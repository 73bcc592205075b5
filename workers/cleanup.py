"""Every cleanup statement statesweep runs, each built here and commented with why.

The rules these statements keep:
- a row is deleted only if ``expires_at < cutoff`` holds at the moment of its DELETE, so each
  DELETE repeats the predicate and a row refreshed after planning survives;
- NULL expires_at never matches ``<``, so never-expiring rows are never deleted;
- every statement runs in its own short transaction; no transaction spans chunks;
- planning reads no rows: planners (workers.planners) cut ranges from probes, and a chunk
  message carries a range, never a list of ids.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Delete,
    Engine,
    and_,
    delete,
    exists,
    func,
    or_,
    select,
    text,
    tuple_,
)

from workers.db import begin_chunk, db_now, set_timeouts
from workers.exceptions import InvalidArgument
from workers.planners import expiry
from workers.planners.base import BLOCKS, EXPIRY, ChunkRange
from workers.schema import Tables
from workers.selection import Selection

EVERYTHING = Selection()


def read_cutoff(engine: Engine) -> dt.datetime:
    """The run's cutoff: the database's now(), read once; workers' clocks are never used."""
    with engine.connect() as conn:
        return db_now(conn)


# --- deleting -----------------------------------------------------------------------------------


def range_condition(tables: Tables, rng: ChunkRange) -> list[Any]:
    """The chunk's range as SQL: heap pages for ``blocks`` (a Tid Range Scan on PostgreSQL
    >= 14), (expires_at, id) keys for ``expiry``, primary-key values otherwise. Half-open;
    ``hi`` None runs to the end of the table (for expiry: to the cutoff)."""
    t = tables.task_state
    cond: list[Any]
    if rng.kind == EXPIRY:
        # An interval of the expires_at index: an index range scan, whatever the table's size.
        cond = expiry.at_or_after(tables, (rng.lo, rng.lo_id))
        if rng.hi is not None:
            cond += expiry.before(tables, (rng.hi, rng.hi_id))
        return cond
    if rng.kind == BLOCKS:
        cond = [text("ctid >= CAST(:ctid_lo AS tid)").bindparams(ctid_lo=f"({rng.lo},0)")]
        if rng.hi is not None:
            cond.append(text("ctid < CAST(:ctid_hi AS tid)").bindparams(ctid_hi=f"({rng.hi},0)"))
        return cond
    cond = [t.c.id >= rng.lo]
    if rng.hi is not None:
        cond.append(t.c.id < rng.hi)
    return cond


#: Airflow's DagRunState values of a dag run whose tasks may still read their state.
UNFINISHED_DAG_RUN_STATES = ("queued", "running")


def unfinished_state(tables: Tables) -> Any:
    """dag_run.state is queued or running, spelled ``state = 'queued' OR state = 'running'``:
    Airflow's partial indexes (``idx_dag_run_queued_dags``, ``idx_dag_run_running_dags``, one
    per state on PostgreSQL) each match one arm, so PostgreSQL reads the few unfinished runs
    from them (a BitmapOr). ``state IN (…)`` is ``= ANY(array)`` there, which implies neither
    index's predicate: every chunk scanned all of dag_run instead (issue 23)."""
    state = tables.dag_run.c.state
    return or_(*(state == s for s in UNFINISHED_DAG_RUN_STATES))


def unfinished_run(tables: Tables) -> Any:
    """The row's dag run is queued or running. Retries of a task share its state, and
    retention counts from the last write, so a long retry delay or a run queued for days lets
    state expire while its task still needs it.

    An uncorrelated ``dag_run_id IN (SELECT id FROM dag_run WHERE <unfinished>)``, part of the
    DELETE itself: the server reads the unfinished runs once per statement, in the DELETE's
    own snapshot (PostgreSQL hashes them, a "hashed SubPlan"; SQLite builds one ephemeral
    index; MariaDB materialises it or probes dag_run's key), and each row costs one probe.
    Judged at the DELETE exactly as a correlated NOT EXISTS is: the same statement, the same
    snapshot, no list fetched earlier that a run turning running could slip past. NOT IN's
    NULL rule changes nothing here: dag_run.id is the primary key and task state's dag_run_id
    is NOT NULL (and a NULL would only keep the row). PostgreSQL hashes the set while its
    estimate fits hash memory (work_mem x hash_mem_multiplier: some 250,000 unfinished runs at
    the defaults); past that it would compare each row with the whole set, still correct."""
    t, dr = tables.task_state, tables.dag_run
    return t.c.dag_run_id.in_(select(dr.c.id).where(unfinished_state(tables)))


def delete_statement(tables: Tables, rng: ChunkRange, cutoff: dt.datetime, *,
                     protect: bool = True, selection: Selection = EVERYTHING) -> Delete:
    """DELETE one chunk's rows that are still expired at *cutoff*. The predicate is repeated
    here, whatever the plan said: a row refreshed after planning has a new expires_at and
    survives; NULL never compares below the cutoff, so never-expiring rows stay. With
    *protect* (and Airflow's dag_run.state), a row whose dag run is queued or running stays,
    judged at the DELETE as the expiry is. A *selection* narrows it to some dag ids."""
    t = tables.task_state
    cond = [*range_condition(tables, rng), t.c.expires_at < cutoff, *selection.conditions(tables)]
    if protect and tables.has_run_state:
        cond.append(~unfinished_run(tables))
    return delete(t).where(*cond)


LagReader = Callable[[Connection], "float | None"]


def delete_range(engine: Engine, tables: Tables, rng: ChunkRange, cutoff: dt.datetime,
                 *, lock_timeout_ms: int = 5000, statement_timeout_ms: int = 120000,
                 max_lag_seconds: float | None = None, read_lag: LagReader | None = None,
                 protect: bool = True, selection: Selection = EVERYTHING,
                 before_commit: Callable[[Connection, int, int | None], None] | None = None
                 ) -> int:
    """Delete one chunk in its own transaction; commit; return rows deleted.

    *before_commit* is called with the transaction's connection, the rows its DELETE took and
    the transaction's id (PostgreSQL; None elsewhere), after the DELETE and before the COMMIT
    (workers.chunk notes the commit in the run store).

    Running it twice deletes nothing the second time (idempotent). With *max_lag_seconds*, the
    replicas' lag is read (*read_lag*, on this transaction's connection) just before the
    DELETE, and a lag over the limit rolls back first (ReplicaLagging): no chunk starts while
    replicas lag.
    """
    with engine.begin() as conn:
        now, xid = begin_chunk(conn, lock_timeout_ms, statement_timeout_ms)
        # The one clock: a cutoff ahead of the database's now would delete rows that have not
        # expired yet (a forged or corrupted message); refuse before the DELETE.
        if cutoff > now:
            raise InvalidArgument(
                f"cutoff {cutoff.isoformat()} is in the future (database now is "
                f"{now.isoformat()}); refusing to delete rows that have not expired")
        if max_lag_seconds is not None and read_lag is not None:
            lag = read_lag(conn)
            if lag is not None and lag > max_lag_seconds:
                raise ReplicaLagging(lag)
        rows = int(conn.execute(delete_statement(tables, rng, cutoff, protect=protect,
                                                 selection=selection)).rowcount)
        if before_commit is not None:
            before_commit(conn, rows, xid)
        return rows


class ReplicaLagging(Exception):
    """A replica lags more than STATESWEEP_MAX_REPLICA_LAG_SECONDS; the chunk did not start."""

    def __init__(self, lag: float) -> None:
        super().__init__(f"replica lag {lag:.1f} s")
        self.lag = lag


# --- orphaned asset state -----------------------------------------------------------------------


def _orphaned(tables: Tables) -> Any:
    """asset_state rows whose asset has no asset_active row (joined on name and uri)."""
    a, aa, s = tables.asset, tables.asset_active, tables.asset_state
    inactive = select(a.c.id).where(
        ~exists().where(and_(aa.c.name == a.c.name, aa.c.uri == a.c.uri))
    )
    return s.c.asset_id.in_(inactive)


@dataclass
class OrphanSweep:
    rows: int = 0
    batches: int = 0


def sweep_orphaned_asset_state(engine: Engine, tables: Tables, batch_size: int,
                               *, lock_timeout_ms: int = 5000,
                               statement_timeout_ms: int = 120000,
                               on_batch: Any = None) -> OrphanSweep:
    """Delete orphaned asset state in batches of ``batch_size`` rows, each committed alone.

    Batches are keyset ranges over (asset_id, key). Each DELETE repeats the orphan test, so an
    asset re-activated between the boundary query and the DELETE keeps its state. Task state is
    never touched. ``batch_size`` 0 deletes all orphans in one statement.
    """
    s = tables.asset_state
    orphaned = _orphaned(tables)
    key = tuple_(s.c.asset_id, s.c.key)
    result = OrphanSweep()
    after: tuple[int, str] | None = None
    while True:
        window = [orphaned] if after is None else [orphaned, key > tuple_(*after)]
        with engine.begin() as conn:
            set_timeouts(conn, lock_timeout_ms, statement_timeout_ms)
            boundary = None
            if batch_size > 0:
                boundary = conn.execute(
                    select(s.c.asset_id, s.c.key).where(*window)
                    .order_by(s.c.asset_id, s.c.key).limit(1).offset(batch_size - 1)
                ).first()
            cond = list(window)
            if boundary is not None:
                cond.append(key <= tuple_(boundary.asset_id, boundary.key))
            t0 = time.perf_counter()
            rows = int(conn.execute(delete(s).where(*cond)).rowcount)
        result.rows += rows
        if rows or boundary is not None:
            result.batches += 1
            if on_batch is not None:
                on_batch(rows, (time.perf_counter() - t0) * 1000)
        if boundary is None:
            return result
        after = (int(boundary.asset_id), str(boundary.key))


def count_orphaned_asset_state(conn: Connection, tables: Tables) -> int:
    s = tables.asset_state
    return int(conn.execute(select(func.count()).select_from(s).where(_orphaned(tables)))
               .scalar_one())


# --- read-only views for dry runs and status ----------------------------------------------------


@dataclass(frozen=True)
class ExpiredSummary:
    cutoff: dt.datetime
    expired_rows: int
    chunks: int
    top_dags: list[tuple[str, int]]
    sample: list[dict[str, Any]]


def summarise_expired(engine: Engine, tables: Tables, cutoff: dt.datetime, batch_size: int,
                      *, top: int = 10, sample: int = 10,
                      selection: Selection = EVERYTHING) -> ExpiredSummary:
    """What a run at *cutoff* would delete, in bounded output: a count (served by the
    expires_at index), the chunks it would make, the top dag_ids, and a small sample; within
    *selection*'s dag ids."""
    t = tables.task_state
    expired = and_(t.c.expires_at < cutoff, *selection.conditions(tables))
    with engine.connect() as conn:
        count = int(conn.execute(select(func.count()).select_from(t).where(expired)).scalar_one())
        top_rows = conn.execute(
            select(t.c.dag_id, func.count().label("n")).where(expired)
            .group_by(t.c.dag_id).order_by(func.count().desc(), t.c.dag_id).limit(top)
        ).all()
        sample_rows = conn.execute(
            select(t.c.id, t.c.dag_id, t.c.run_id, t.c.task_id,
                   tables.index_column.label("map_index"), t.c.key, t.c.expires_at)
            .where(expired).order_by(t.c.id).limit(sample)
        ).mappings().all()
    chunks = 0 if count == 0 else (1 if batch_size == 0 else -(-count // batch_size))
    return ExpiredSummary(
        cutoff=cutoff, expired_rows=count, chunks=chunks,
        top_dags=[(str(r.dag_id), int(r.n)) for r in top_rows],
        sample=[dict(r) for r in sample_rows],
    )


@dataclass(frozen=True)
class Protected:
    """Expired rows kept because their dag run is unfinished, and the oldest one's expiry."""

    rows: int
    oldest: dt.datetime | None


def count_protected(conn: Connection, tables: Tables, cutoff: dt.datetime) -> Protected:
    """Expired rows of queued or running dag runs: found from the unfinished dag runs (few)
    into task state by dag_run_id, the unique key's first column; nothing read on a schema
    without dag_run.state."""
    if not tables.has_run_state:
        return Protected(0, None)
    t, dr = tables.task_state, tables.dag_run
    row = conn.execute(
        select(func.count(), func.min(t.c.expires_at)).select_from(
            t.join(dr, dr.c.id == t.c.dag_run_id))
        .where(unfinished_state(tables), t.c.expires_at < cutoff)).one()
    oldest = row[1]
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=dt.UTC)
    return Protected(int(row[0]), oldest)


def count_expired(engine: Engine, tables: Tables, cutoff: dt.datetime) -> int:
    t = tables.task_state
    with engine.connect() as conn:
        return int(conn.execute(
            select(func.count()).select_from(t).where(t.c.expires_at < cutoff)
        ).scalar_one())
