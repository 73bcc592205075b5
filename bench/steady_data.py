"""The steady state's data: an Airflow-shaped task_state whose rows expire continuously, about
1% of the table per interval, from a moment (the anchor) just after it is built; and the table
statistics a cycle is judged by.

Shape, from workers.seed (ids ascend with write time; 10% never expire), then:
- the rows that expire during the run are the oldest writes, 1% of the table per interval in
  (write position) order, where a row's write position is its id, or, for a rewritten row, a
  little later (id + 5% of the table): it was written again after its first write;
- a fifth of the rows (id % 5 = 2) were rewritten by upsert after the others: their live
  versions sit at the end of the heap, so what expires in one interval is both rows packed at
  the heap's start and rows scattered over its end;
- everything else expires in 1 to 30 days (the seed's rule), outside the measured cycles.
The rows that expire soon are set before a CLUSTER (so originals stay in id order on disk) and
the rewrite comes after it, then VACUUM ANALYZE: a steady table after its first backlog.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import text

from workers.db import make_engine
from workers.schema import Tables, upgrade
from workers.seed import SeedSpec, seed

#: 10% never expire, the rest in the future: nothing expired when the build ends.
SPEC = SeedSpec(period=100, expired_per_period=0, never_per_period=10)
#: The rewritten fifth, as a condition on the id column *of* the given table or alias.
REWRITTEN = "{of}id % 5 = 2"

# Each soon-expiring row's rank in write order; :shift delays the rewritten ones. Table names
# come from build_tables, never from input.
_RANKED = f"""
    WITH ranked AS (
        SELECT id, row_number() OVER (
                   ORDER BY CASE WHEN {REWRITTEN.format(of="")} THEN id + :shift ELSE id END) AS r
        FROM {{ts}} WHERE expires_at IS NOT NULL)
"""  # noqa: S608
_EXPIRES = "CAST(:anchor AS timestamptz) + ranked.r * :step * interval '1 microsecond'"


def build(url: str, tables: Tables, rows: int, per_interval: int, soon: int, interval: float,
          anchor: dt.datetime, now: dt.datetime) -> dict[str, Any]:
    """Seed *rows* and shape them (module docstring): row k of the *soon* ones (k >= 1) expires
    at anchor + k * interval / per_interval."""
    ts = tables.task_state.name
    params = {"anchor": anchor, "step": int(interval * 1e6 / per_interval),
              "shift": rows // 20, "soon": soon, "now": now}
    engine = make_engine(url)
    try:
        upgrade(engine, tables.naming)
        seed(engine, tables, SeedSpec(rows=rows, period=SPEC.period, expired_per_period=0,
                                      never_per_period=SPEC.never_per_period), now)
        ranked = _RANKED.format(ts=ts)
        with engine.begin() as conn:
            conn.execute(text(ranked + f"""
                UPDATE {ts} t SET expires_at = {_EXPIRES} FROM ranked
                WHERE t.id = ranked.id AND ranked.r <= :soon AND NOT ({REWRITTEN.format(of="t.")})
            """), params)  # noqa: S608
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"CLUSTER {ts} USING {ts}_pkey"))
        with engine.begin() as conn:
            rewritten = conn.execute(text(ranked + f"""
                UPDATE {ts} t SET value = t.value || '+', updated_at = :now,
                    expires_at = CASE WHEN ranked.r <= :soon THEN {_EXPIRES}
                                      ELSE t.expires_at END
                FROM ranked WHERE t.id = ranked.id AND {REWRITTEN.format(of="t.")}
            """), params).rowcount  # noqa: S608
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"VACUUM ANALYZE {ts}"))
            never = conn.execute(text(
                f"SELECT count(*) FROM {ts} WHERE expires_at IS NULL")).scalar_one()  # noqa: S608
    finally:
        engine.dispose()
    return {"rows": rows, "never": int(never), "rewritten": int(rewritten),
            "expiring_in_window": soon, "per_interval": per_interval, **table_stats(url, ts)}


_STATS = """
    SELECT s.seq_tup_read + coalesce(s.idx_tup_fetch, 0) AS rows_read, s.n_tup_del AS deleted,
           io.heap_blks_read + io.heap_blks_hit AS heap_blocks,
           coalesce(io.idx_blks_read + io.idx_blks_hit, 0) AS index_blocks,
           s.n_dead_tup AS dead, s.autovacuum_count + s.autoanalyze_count AS autovacuums,
           pg_relation_size(s.relid) / 8192 AS pages
    FROM pg_stat_user_tables s JOIN pg_statio_user_tables io USING (relid)
    WHERE s.relname = :table
"""


def table_stats(url: str, table: str = "task_state") -> dict[str, int]:
    """The table's cumulative read counters (every backend's, as flushed so far) and size, read
    in a new session so no earlier stats snapshot is reused."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(text(_STATS), {"table": table}).mappings().one()
    finally:
        engine.dispose()
    return {k: int(v) for k, v in row.items()}


def expired_before(url: str, table: str, when: dt.datetime) -> int:
    """Rows that had expired at *when* and are still there."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(
                f"SELECT count(*) FROM {table} WHERE expires_at < :when"),  # noqa: S608
                {"when": when}).scalar_one())
    finally:
        engine.dispose()
