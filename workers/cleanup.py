"""Every cleanup statement statesweep runs, each built here and commented with why.

The rules these statements keep (shared/DESIGN.md):
- a row is deleted only if ``expires_at < cutoff`` holds at the moment of its DELETE, so each
  DELETE repeats the predicate and a row refreshed after planning survives;
- NULL expires_at never matches ``<``, so never-expiring rows are never deleted;
- every statement runs in its own short transaction; no transaction spans chunks;
- planning keeps O(1) ids in memory: the server walks the ids, Python sees two per chunk.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, and_, delete, exists, func, select, tuple_

from workers.db import begin_chunk, db_now, set_timeouts
from workers.exceptions import InvalidArgument
from workers.schema import Tables


@dataclass(frozen=True)
class Chunk:
    """Ids ``lo..hi`` (inclusive) holding ``expected`` rows expired at planning time."""

    number: int
    lo: int
    hi: int
    expected: int


def read_cutoff(engine: Engine) -> dt.datetime:
    """The run's cutoff: the database's now(), read once; workers' clocks are never used."""
    with engine.connect() as conn:
        return db_now(conn)


# --- planning -----------------------------------------------------------------------------------


def plan_chunks(engine: Engine, tables: Tables, cutoff: dt.datetime,
                batch_size: int) -> Iterator[Chunk]:
    """Yield id ranges each holding ``batch_size`` expired rows, in id order, as they are cut.

    Each step asks the server for the ``batch_size``-th expired id after the previous range
    (``ORDER BY id LIMIT 2 OFFSET batch_size-1``): the primary-key index is walked on the server
    and two ids come back, that range's end and the next range's start. Every query is its own
    autocommit transaction, so planning a huge table holds no snapshot open and the caller can
    send each chunk the moment it is cut. ``batch_size`` 0 means one chunk for everything.
    """
    t = tables.task_state
    expired = t.c.expires_at < cutoff
    with engine.connect() as conn:
        # Autocommit: each query below is its own transaction, so no snapshot is held across
        # the plan; one connection spares a pool checkout and pre-ping per step.
        conn.execution_options(isolation_level="AUTOCOMMIT")
        first = conn.execute(select(func.min(t.c.id)).where(expired)).scalar_one_or_none()
        if first is None:
            return
        if batch_size == 0:
            hi, count = conn.execute(
                select(func.max(t.c.id), func.count()).where(expired)
            ).one()
            yield Chunk(1, int(first), int(hi), int(count))
            return

        lo = int(first)
        number = 0
        while True:
            number += 1
            ids = conn.execute(
                select(t.c.id).where(t.c.id >= lo, expired)
                .order_by(t.c.id).limit(2).offset(batch_size - 1)
            ).scalars().all()
            if ids:
                chunk = Chunk(number, lo, int(ids[0]), batch_size)
            else:
                # Fewer than batch_size expired rows are left: the last range ends at the last
                # one. Walk the primary key backwards so only the tail is read.
                hi = conn.execute(
                    select(t.c.id).where(t.c.id >= lo, expired).order_by(t.c.id.desc()).limit(1)
                ).scalar_one_or_none()
                if hi is None:
                    return
                count = conn.execute(
                    select(func.count()).where(t.c.id.between(lo, hi), expired)
                ).scalar_one()
                chunk = Chunk(number, lo, int(hi), int(count))
            yield chunk
            if len(ids) < 2:
                return
            lo = int(ids[1])


# --- deleting -----------------------------------------------------------------------------------


def delete_chunk(engine: Engine, tables: Tables, lo: int, hi: int, cutoff: dt.datetime,
                 *, lock_timeout_ms: int = 5000, statement_timeout_ms: int = 120000) -> int:
    """Delete the rows of ids lo..hi still expired at *cutoff*; commit; return rows deleted.

    The predicate is re-checked here, at DELETE time: a row refreshed after planning has a new
    expires_at and survives. Running it twice deletes nothing the second time (idempotent).
    """
    t = tables.task_state
    stmt = delete(t).where(t.c.id.between(lo, hi), t.c.expires_at < cutoff)
    with engine.begin() as conn:
        now = begin_chunk(conn, lock_timeout_ms, statement_timeout_ms)
        # The one clock: a cutoff ahead of the database's now would delete rows that have not
        # expired yet (a forged or corrupted message); refuse before the DELETE.
        if cutoff > now:
            raise InvalidArgument(
                f"cutoff {cutoff.isoformat()} is in the future (database now is "
                f"{now.isoformat()}); refusing to delete rows that have not expired")
        return int(conn.execute(stmt).rowcount)


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
                      *, top: int = 10, sample: int = 10) -> ExpiredSummary:
    """What a run at *cutoff* would delete, in bounded output: a count (served by the
    expires_at index), the chunks it would make, the top dag_ids, and a small sample."""
    t = tables.task_state
    expired = t.c.expires_at < cutoff
    with engine.connect() as conn:
        count = int(conn.execute(select(func.count()).select_from(t).where(expired)).scalar_one())
        top_rows = conn.execute(
            select(t.c.dag_id, func.count().label("n")).where(expired)
            .group_by(t.c.dag_id).order_by(func.count().desc(), t.c.dag_id).limit(top)
        ).all()
        sample_rows = conn.execute(
            select(t.c.id, t.c.dag_id, t.c.run_id, t.c.task_id, t.c.map_index, t.c.key,
                   t.c.expires_at).where(expired).order_by(t.c.id).limit(sample)
        ).mappings().all()
    chunks = 0 if count == 0 else (1 if batch_size == 0 else -(-count // batch_size))
    return ExpiredSummary(
        cutoff=cutoff, expired_rows=count, chunks=chunks,
        top_dags=[(str(r.dag_id), int(r.n)) for r in top_rows],
        sample=[dict(r) for r in sample_rows],
    )


def count_expired(engine: Engine, tables: Tables, cutoff: dt.datetime) -> int:
    t = tables.task_state
    with engine.connect() as conn:
        return int(conn.execute(
            select(func.count()).select_from(t).where(t.c.expires_at < cutoff)
        ).scalar_one())
