"""A run narrowed to some dag ids: id ranges of the selected dags' expired rows, found through
the dag_id index, so the run's reads follow those dags' rows, not the table.

Every planner's DELETE applies the run's selection, but the others cut the table (pages, ids)
or its expired rows (the expires_at index): a run for one dag of a hundred in a backlog read
the whole heap to delete a hundredth of it. Here the plan reads the selected dags' rows once,
through the index Airflow keeps on ``(dag_id, run_id, task_id, map_index)`` (3.4:
``region_index``), in one aggregate statement: how many of them expired, the first and last
expired id, and the narrowest id span that holds ``2·batch_size + 1`` of them (``lead(id, 2B)
OVER (ORDER BY id)``, sorted by the server; nothing comes back but four numbers). Chunks are
then id ranges cut by arithmetic, like ``ids``, each at most that narrowest span wide, so no
chunk holds more than twice the batch of the rows that were expired when the run was planned.
Each DELETE is ``id`` range AND the dag ids AND ``expires_at < cutoff``: the server reads the
selected dags' rows from the dag_id index (the id range is as wide as those dags' rows are
spread), and re-checks the expiry and the selection for every row, as every chunk does.

A run costs the selected dags' rows once for the plan and once a chunk, so ``auto`` takes it
only where that is less than what a plan of the table would read, and where one chunk's read
stays within ``ids.MAX_BATCHES_PER_CHUNK`` batches, the bound an ``ids`` chunk keeps.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from sqlalchemy import Connection, and_, bindparam, func, select, text

from workers.planners.base import DAGS, Plan, Unsupported
from workers.planners.ids import MAX_BATCHES_PER_CHUNK
from workers.schema import Tables
from workers.selection import Selection


@dataclass(frozen=True)
class Spread:
    """Where the selected dags' expired rows lie in id space."""

    expired: int
    first: int
    last: int
    #: The widest id range that cannot hold more than twice the batch of them; 0 = any.
    narrowest: int


def named(selection: Selection) -> str:
    """The dag ids, as a reason names them (a long list shortened)."""
    ids = selection.dag_ids
    shown = ", ".join(ids[:3])
    return shown if len(ids) <= 3 else f"{shown} and {len(ids) - 3} more"


def estimate_selected(conn: Connection, tables: Tables, selection: Selection,
                      cap: int) -> int:
    """About how many rows the selected dag ids hold: the server's estimate of a range on the
    dag_id index (EXPLAIN: statistics and, on InnoDB, an index dive; no row read), or on
    SQLite, which has none, a count of the index's entries up to *cap*."""
    t = tables.task_state
    if conn.dialect.name == "postgresql" or conn.dialect.name in ("mysql", "mariadb"):
        quote = conn.dialect.identifier_preparer
        column, table = quote.quote(t.c.dag_id.name), quote.format_table(t)
        explain = "EXPLAIN (FORMAT JSON)" if conn.dialect.name == "postgresql" else "EXPLAIN"
        statement = text(f"{explain} SELECT 1 FROM {table} "  # noqa: S608
                         f"WHERE {column} IN :dag_ids").bindparams(
            bindparam("dag_ids", list(selection.dag_ids), expanding=True))
        try:
            if conn.dialect.name == "postgresql":
                found = conn.execute(statement).scalar()
                return int(found[0]["Plan"]["Plan Rows"])  # type: ignore[index]
            return sum(int(r["rows"] or 0) for r in conn.execute(statement).mappings().all())
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    inner = select(t.c.id).where(t.c.dag_id.in_(selection.dag_ids)).limit(max(1, cap))
    return int(conn.execute(select(func.count()).select_from(inner.subquery())).scalar_one())


def spread(conn: Connection, tables: Tables, cutoff: dt.datetime, selection: Selection,
           batch_size: int) -> Spread | None:
    """One read of the selected dags' rows (the dag_id index, then each row for its expiry):
    their expired rows' count, first and last id, and the narrowest span of ``2·batch_size + 1``
    of them, all computed by the server; None when none has expired."""
    t = tables.task_state
    per_chunk = 2 * batch_size if batch_size else 1
    ahead = func.lead(t.c.id, bindparam("per_chunk", per_chunk, literal_execute=True)).over(
        order_by=t.c.id)
    expired = (select(t.c.id.label("id"), ahead.label("ahead"))
               .where(and_(t.c.expires_at < cutoff, *selection.conditions(tables))).subquery())
    count, first, last, gap = conn.execute(select(
        func.count(), func.min(expired.c.id), func.max(expired.c.id),
        func.min(expired.c.ahead - expired.c.id))).one()
    if not count:
        return None
    return Spread(int(count), int(first), int(last), 0 if gap is None else int(gap))


def chunk_ids(found: Spread, batch_size: int) -> tuple[int, int]:
    """(ids a chunk spans at first, the most it may span): about ``batch_size`` rows a chunk
    where the rows are spread evenly, never wider than the narrowest span of twice that."""
    span = found.last - found.first + 1
    most = found.narrowest or span
    if batch_size == 0:
        return span, span
    even = math.ceil(batch_size * span / found.expired)
    return max(1, min(most, even)), max(1, most)


def plan_for(conn: Connection, tables: Tables, cutoff: dt.datetime, batch_size: int,
             selection: Selection, found: Spread | None = None) -> Plan:
    if not selection.dag_ids:
        raise Unsupported("it plans a run narrowed to dag ids (--dag-ids, STATESWEEP_DAG_IDS)")
    found = found or spread(conn, tables, cutoff, selection, batch_size)
    if found is None:
        return Plan(DAGS, DAGS, 0, 0, 1, 0, f"no expired rows of dag ids {named(selection)}")
    size, most = chunk_ids(found, batch_size)
    if batch_size == 0:
        bound = "in one chunk (no batching)"
    elif found.narrowest == 0:
        bound = f"{size} ids a chunk"
    else:
        bound = (f"{size} ids a chunk, at most {most}: no {most} ids hold more than "
                 f"{2 * batch_size} of them")
    return Plan(DAGS, DAGS, found.first, found.last + 1, size, found.expired,
                f"{found.expired} expired rows of dag ids {named(selection)} read through "
                f"the dag_id index: ids {found.first}..{found.last}, {bound}",
                max_size=0 if batch_size == 0 else most)


def consider(conn: Connection, tables: Tables, cutoff: dt.datetime, batch_size: int,
             selection: Selection, *, selected: int,
             table_cost: int | None) -> Plan | tuple[Plan, int] | str:
    """``auto``'s plan for a run narrowed to dag ids that hold about *selected* rows, when it
    reads less than *table_cost* (the rows a plan of the table would read: its expired rows in
    the steady state, the table in a backlog); else why not, for the reason of the plan taken
    instead. With *table_cost* None (not known yet) the plan and its reads, for the caller to
    weigh."""
    most = MAX_BATCHES_PER_CHUNK * batch_size
    if batch_size and selected > most:
        return (f"dag ids {named(selection)} hold about {selected} rows, more than a chunk "
                f"reads ({MAX_BATCHES_PER_CHUNK} batches)")
    if table_cost is not None and 2 * selected >= table_cost:
        return (f"dag ids {named(selection)} hold about {selected} rows, read twice: not "
                f"under the {table_cost} rows a plan of the table reads")
    found = spread(conn, tables, cutoff, selection, batch_size)
    plan = plan_for(conn, tables, cutoff, batch_size, selection, found)
    # The dags hold at least their expired rows, whatever the estimate said.
    selected = max(selected, plan.expected_rows)
    if batch_size and selected > most:
        return (f"dag ids {named(selection)} hold at least {selected} rows, more than a "
                f"chunk reads ({MAX_BATCHES_PER_CHUNK} batches)")
    cost = selected * (1 + plan.estimated_chunks)
    if table_cost is None:
        return plan, cost
    if found is not None and cost >= table_cost:
        return (f"dag ids {named(selection)}: {plan.estimated_chunks} chunks of about "
                f"{selected} rows read each, not under the {table_cost} rows a plan of the "
                f"table reads")
    return plan

