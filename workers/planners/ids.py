"""Tables clustered by their integer primary key (InnoDB, SQLite's rowid): chunks are id ranges.

Where rows are stored in primary-key order, an id range is a physical range, and a DELETE over
it is a clustered-index range scan. Planning reads the first and last expired id from the
expires_at index and counts a few fixed-size id windows to estimate how densely expired rows sit
between them; no walk of live rows.
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
    """(first, last) expired id, or None when nothing has expired.

    Read from the expires_at index, which holds the expired rows together (and, on InnoDB, their
    ids with them): never a walk of live rows in id order, which after a big run, or where the
    newest rows are live, reads most of the table before it meets an expired row."""
    t = tables.task_state
    first, last = conn.execute(
        select(func.min(t.c.id), func.max(t.c.id)).where(t.c.expires_at < cutoff)).one()
    if first is None:
        return None
    return int(first), int(last)


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
            return Plan(self.name, IDS, first, last + 1, span, int(per_id * span),
                        f"expired ids {first}..{last} in one chunk (no batching)")
        # An id is one row at most: 2B ids hold at most twice the batch, however dense.
        most = 2 * batch_size
        size = most if per_id <= 0 else max(1, min(most, math.ceil(batch_size / per_id)))
        return Plan(self.name, IDS, first, last + 1, size, int(per_id * span),
                    f"expired ids {first}..{last}, about {per_id:.0%} of ids expired: "
                    f"{size} ids a chunk", max_size=most)
