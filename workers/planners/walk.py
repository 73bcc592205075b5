"""The fallback: cut id ranges holding exactly ``batch_size`` expired rows by walking the index.

Each cut asks the server for the batch_size-th expired id at or after the cursor (``ORDER BY
id LIMIT 2 OFFSET B-1``): one index walk per chunk, done when the window has room for the
chunk, never for the whole run up front. It serves any database, and wins where expired rows
are a small fraction of a large table: the server can find them through the expires_at index
instead of scanning pages that hold none.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, select

from workers.planners import ids
from workers.planners.base import WALK, Plan
from workers.schema import Tables


def cut(conn: Connection, tables: Tables, cutoff: dt.datetime, lo: int, end: int,
        batch_size: int) -> tuple[int, int | None]:
    """The chunk starting at id *lo*: (hi exclusive, next lo or None when this is the last)."""
    t = tables.task_state
    if batch_size == 0:
        return end, None
    found = conn.execute(
        select(t.c.id).where(t.c.id >= lo, t.c.id < end, t.c.expires_at < cutoff)
        .order_by(t.c.id).limit(2).offset(batch_size - 1)
    ).scalars().all()
    if len(found) < 2:
        return end, None
    return int(found[0]) + 1, int(found[1])


class WalkPlanner:
    name = WALK

    def check(self, conn: Connection, tables: Tables) -> None:
        """The walk works on every database statesweep supports."""

    def plan(self, conn: Connection, tables: Tables, cutoff: dt.datetime,
             batch_size: int) -> Plan:
        found = ids.bounds(conn, tables, cutoff)
        if found is None:
            return Plan(self.name, WALK, 0, 0, batch_size, 0, "no expired rows")
        first, last = found
        return Plan(self.name, WALK, first, last + 1, batch_size, 0,
                    f"expired ids {first}..{last}, cut every {batch_size} expired rows")
