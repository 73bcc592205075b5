"""Tables clustered by their integer primary key (InnoDB, SQLite's rowid): chunks are id ranges.

Where rows are stored in primary-key order, an id range is a physical range, and a DELETE over
it is a clustered-index range scan. Planning is two index probes (the first and last expired id,
read in primary-key order so each stops at the first match) and a few fixed-size id windows
counted to estimate how densely expired rows sit between them; no row walk.
"""

from __future__ import annotations

import datetime as dt
import math

from sqlalchemy import Connection, func, select

from workers.planners.base import IDS, Plan
from workers.schema import Tables

#: Id windows counted to estimate density, and the width of each: a fixed cost.
DENSITY_WINDOWS = 8
WINDOW_IDS = 1000
#: A chunk spans at most this many batches' worth of ids, so a sparse range cannot make one
#: long transaction.
MAX_BATCHES_PER_CHUNK = 20


def bounds(conn: Connection, tables: Tables, cutoff: dt.datetime) -> tuple[int, int] | None:
    """(first, last) expired id, or None when nothing has expired."""
    t = tables.task_state
    expired = t.c.expires_at < cutoff
    first = conn.execute(select(t.c.id).where(expired).order_by(t.c.id).limit(1)).scalar()
    if first is None:
        return None
    last = conn.execute(select(t.c.id).where(expired).order_by(t.c.id.desc()).limit(1)).scalar()
    return int(first), int(last if last is not None else first)


def density(conn: Connection, tables: Tables, cutoff: dt.datetime, first: int,
            last: int) -> float:
    """Expired rows per id between *first* and *last*, from evenly spaced id windows."""
    t = tables.task_state
    span = last - first + 1
    width = min(WINDOW_IDS, span)
    step = max(1, (span - width) // max(1, DENSITY_WINDOWS - 1))
    counted = expired = 0
    for i in range(DENSITY_WINDOWS if span > width else 1):
        lo = first + i * step
        n = conn.execute(select(func.count()).select_from(t).where(
            t.c.id >= lo, t.c.id < lo + width, t.c.expires_at < cutoff)).scalar_one()
        counted += width
        expired += int(n)
    return expired / counted if counted else 0.0


class IdsPlanner:
    name = IDS

    def check(self, conn: Connection, tables: Tables) -> None:
        """Any dialect can cut id ranges; they are physical only where rows cluster by id."""

    def plan(self, conn: Connection, tables: Tables, cutoff: dt.datetime,
             batch_size: int) -> Plan:
        found = bounds(conn, tables, cutoff)
        if found is None:
            return Plan(self.name, IDS, 0, 0, 1, 0, "no expired rows")
        first, last = found
        span = last - first + 1
        per_id = density(conn, tables, cutoff, first, last)
        if batch_size == 0:
            size = span
        else:
            cap = max(1000, batch_size * MAX_BATCHES_PER_CHUNK)
            size = cap if per_id <= 0 else max(1, min(cap, math.ceil(batch_size / per_id)))
        return Plan(self.name, IDS, first, last + 1, size, int(per_id * span),
                    f"expired ids {first}..{last}, about {per_id:.0%} of ids expired: "
                    f"{size} ids a chunk")
