"""An experiment, not statesweep code: can the coordinator plan faster than
workers.cleanup.plan_chunks without giving up its rules (O(1) memory, no long transaction,
chunks sent as they are cut)?

``as_is``          workers.cleanup.plan_chunks: one pooled checkout (with pre-ping) per step.
``one_connection`` the same statements on one autocommit connection for the whole plan.
``windowed``       one autocommit connection, and each statement cuts ``K`` chunks: it walks
                   the next K*B+1 expired ids (a bounded walk, so a bounded statement) and
                   returns only the boundary ids, numbered by row_number().

Each variant must produce exactly the chunks of ``as_is``; the bench checks that.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Engine, func, select, text

from workers import cleanup
from workers.cleanup import Chunk
from workers.db import db_now
from workers.schema import Tables

WINDOW_CHUNKS = 10

# Boundary ids of the next K chunks after :lo: chunk ends (rn a multiple of B) and chunk starts
# (rn one past a multiple). The walk is bounded by the LIMIT, so the statement is too.
_WINDOW = """
    SELECT id, rn FROM (
        SELECT id, row_number() OVER (ORDER BY id) AS rn
        FROM (SELECT id FROM {table} WHERE id >= :lo AND expires_at < :cutoff
              ORDER BY id LIMIT :walk) AS walked
    ) AS numbered
    WHERE rn % :batch IN (0, 1)
    ORDER BY rn
"""


def plan_one_connection(conn: Connection, tables: Tables, cutoff: dt.datetime,
                        batch: int) -> Iterator[Chunk]:
    t = tables.task_state
    expired = t.c.expires_at < cutoff
    lo = conn.execute(select(func.min(t.c.id)).where(expired)).scalar_one_or_none()
    number = 0
    while lo is not None:
        number += 1
        ids = conn.execute(select(t.c.id).where(t.c.id >= lo, expired).order_by(t.c.id)
                           .limit(2).offset(batch - 1)).scalars().all()
        if ids:
            yield Chunk(number, int(lo), int(ids[0]), batch)
            lo = ids[1] if len(ids) == 2 else None
            continue
        hi = conn.execute(select(t.c.id).where(t.c.id >= lo, expired)
                          .order_by(t.c.id.desc()).limit(1)).scalar_one_or_none()
        if hi is not None:
            count = conn.execute(select(func.count()).where(t.c.id.between(lo, hi), expired))
            yield Chunk(number, int(lo), int(hi), int(count.scalar_one()))
        return


def plan_windowed(conn: Connection, tables: Tables, cutoff: dt.datetime, batch: int,
                  k: int = WINDOW_CHUNKS) -> Iterator[Chunk]:
    t = tables.task_state
    expired = t.c.expires_at < cutoff
    window = text(_WINDOW.format(table=t.name))
    lo = conn.execute(select(func.min(t.c.id)).where(expired)).scalar_one_or_none()
    number = 0
    walk = k * batch + 1
    while lo is not None:
        rows = conn.execute(window, {"lo": lo, "cutoff": cutoff, "walk": walk,
                                     "batch": batch}).all()
        last_rn = 0
        for id_, rn in rows:
            last_rn = rn
            if rn % batch == 0:
                number += 1
                yield Chunk(number, int(lo), int(id_), batch)
            elif rn > 1:
                lo = id_
        if last_rn == walk:
            continue  # lo is the first id of the next window
        if last_rn % batch == 0:
            return
        # The table ended inside this window: the last chunk is lo..the last expired id.
        hi = conn.execute(select(t.c.id).where(t.c.id >= lo, expired)
                          .order_by(t.c.id.desc()).limit(1)).scalar_one()
        count = conn.execute(select(func.count()).where(t.c.id.between(lo, hi), expired))
        yield Chunk(number + 1, int(lo), int(hi), int(count.scalar_one()))
        return


def compare(engine: Engine, tables: Tables, batch: int) -> dict[str, Any]:
    """Time each variant over the live table; say whether each cut the same chunks."""
    with engine.connect() as conn:
        cutoff = db_now(conn)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    reference = list(cleanup.plan_chunks(engine, tables, cutoff, batch))
    out["as_is"] = {"seconds": round(time.perf_counter() - t0, 3), "chunks": len(reference)}
    variants = [("one_connection", plan_one_connection)]
    if batch > 1:  # windowed numbers rows by their remainder modulo the batch
        variants.append(("windowed", plan_windowed))
    for name, plan in variants:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            t0 = time.perf_counter()
            chunks = list(plan(conn, tables, cutoff, batch))
            seconds = time.perf_counter() - t0
        out[name] = {"seconds": round(seconds, 3), "chunks": len(chunks),
                     "same_chunks": chunks == reference}
    return out
