"""Planners: named strategies that split a run's expired rows into chunks without reading rows.

=========  ==========================================  =====================================
name       chunks are                                  serves
=========  ==========================================  =====================================
blocks     heap page (ctid) ranges, last open-ended    PostgreSQL >= 14, heap tables
ids        primary-key ranges by arithmetic            InnoDB and SQLite (rows cluster by id)
walk       id ranges of exactly B expired rows, cut    any database (superseded by expiry)
           by an index walk as the window has room
expiry     (expires_at, id) intervals of the expiry    any database; the steady state,
           index, at most B rows each, cut by index    where a small share of the table
           probes as the window has room               has expired
dags       id ranges of the selected dags' expired     any database; a run narrowed to
           rows, found through the dag_id index,       dag ids (--dag-ids) whose rows are
           none wider than 2B of them span (auto       few next to what a table plan reads
           only: not a STATESWEEP_PLANNER value)
=========  ==========================================  =====================================

``STATESWEEP_PLANNER=auto`` picks by regime from a fixed-cost estimate and says why: physical
ranges (blocks, ids) for a backlog, the expiry index for the steady state, and for a run
narrowed to dag ids the dag_id index where it reads less than either; a planner forced
by name that this database cannot serve is a settings error before anything is deleted.
Correctness never rests on the plan: every DELETE re-checks ``expires_at < cutoff``, so a stale
or approximate plan can leave rows for the next run but never deletes a live one.
"""

from __future__ import annotations

import datetime as dt
import importlib
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from workers.exceptions import SettingsError
from workers.planners.base import (
    BLOCKS,
    CUT_KINDS,
    DAGS,
    EXPIRY,
    IDS,
    KINDS,
    WALK,
    ChunkRange,
    Plan,
    Planner,
    Unsupported,
)

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from workers.planners import blocks, dags, expiry, ids, walk  # noqa: F401
    from workers.schema import Tables
    from workers.selection import Selection

__all__ = ["BLOCKS", "CUT_KINDS", "DAGS", "EXPIRY", "IDS", "KINDS", "PLANNERS", "WALK",
           "ChunkRange", "Plan", "Planner", "choose"]

# The planner modules import SQLAlchemy; workers.runs (and so every CLI command) needs only
# the range and plan types of workers.planners.base. The modules and PLANNERS are loaded on
# first use, so `statesweep cleanup --wait` never imports SQLAlchemy.
_SUBMODULES = ("blocks", "dags", "expiry", "ids", "walk")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"workers.planners.{name}")
    if name == "PLANNERS":
        return _planners()
    if name == "CHOICES":
        return ("auto", *_planners())
    raise AttributeError(f"module 'workers.planners' has no attribute {name!r}")


_registry: dict[str, Planner] = {}


def _planners() -> dict[str, Planner]:
    """Every planner by name, built on first use."""
    if not _registry:
        from workers.planners.blocks import BlocksPlanner
        from workers.planners.expiry import ExpiryPlanner
        from workers.planners.ids import IdsPlanner
        from workers.planners.walk import WalkPlanner

        _registry.update({p.name: p for p in (BlocksPlanner(), IdsPlanner(), WalkPlanner(),
                                              ExpiryPlanner())})
    return _registry


#: At or above this expired fraction `auto` cuts physical ranges (blocks, ids); below it, the
#: expiry index. From the crossover `python -m bench.crossover --repeat 3` measured (bench/
#: results/crossover.md, medians of 3, expired rows interleaved): on PostgreSQL the expiry index
#: used less CPU than block ranges up to about 14% expired (wall: 34%), on MariaDB up to about
#: 6% (wall: 9%) against id ranges. Each threshold sits under its database's crossover (where
#: expired rows cluster in old pages, as in a real backlog, physical ranges win sooner).
BACKLOG_FRACTIONS = {"postgresql": 0.12, "mysql": 0.05, "mariadb": 0.05}
BACKLOG_FRACTION = 0.05  # SQLite, clustered by rowid as InnoDB by id


def backlog_fraction(dialect: str) -> float:
    return BACKLOG_FRACTIONS.get(dialect, BACKLOG_FRACTION)


#: An ids plan that would cut this many times more chunks than the expired rows fill is sparse
#: in id space (an outlying id, ids reused far apart): `auto` takes the expiry index instead.
SPARSE_IDS_FACTOR = 4
CLUSTERED_BY_ID = ("mysql", "mariadb", "sqlite")


def choose(conn: Connection, tables: Tables, cutoff: dt.datetime, batch_size: int,
           setting: str = "auto", selection: Selection | None = None) -> Plan:
    """The plan of one run, by the planner *setting* names (or the one `auto` picks); the
    run's *selection* (its dag ids) lets `auto` plan from the selected dags' rows alone."""
    from workers.planners import dags, expiry

    if setting == DAGS:
        # Not a setting (a beat run names no dag ids): `auto` takes it for a run narrowed to
        # dag ids; by name for comparisons (bench, tests).
        try:
            plan = dags.plan_for(conn, tables, cutoff, batch_size, selection or _everything())
        except Unsupported as exc:
            raise SettingsError(f"planner {DAGS!r}: this run cannot use it: {exc}") from None
        return replace(plan, reason=f"set by name; {plan.reason}")
    if setting != "auto":
        planners = _planners()
        planner = planners[setting]
        try:
            planner.check(conn, tables)
        except Unsupported as exc:
            raise SettingsError(f"STATESWEEP_PLANNER={setting!r}: this database cannot use "
                                f"it: {exc}; use auto, or one of {', '.join(planners)}") from None
        plan = planner.plan(conn, tables, cutoff, batch_size)
        return replace(plan, reason=f"set by STATESWEEP_PLANNER; {plan.reason}")
    # The regime, from the index: expired rows counted up to BACKLOG_FRACTION of the catalog's
    # row estimate. In the steady state that count is the run's own rows (and the plan's
    # estimate); only a backlog stops at the cap and goes on to a physical plan.
    fraction = backlog_fraction(conn.dialect.name)
    rows = expiry.table_rows(conn, tables)
    cap = max(1, int(rows * fraction))
    # Where the expired rows start (one probe), then the server's estimate of them from there:
    # well under the threshold, the steady state needs no count, which reads every expired
    # row's index entry and, on PostgreSQL without a VACUUM, its heap tuple too.
    first = expiry.first_key(conn, tables, cutoff)
    if first is None:
        return _steady(conn, tables, cutoff, batch_size,
                       f"nothing expired of about {rows} rows (under {fraction:.0%})", counted=0)
    estimated = expiry.estimate_expired(conn, tables, cutoff, first)
    counted: int | None = None
    if selection is not None and selection.dag_ids:
        found, counted = _for_dags(conn, tables, cutoff, batch_size, selection, rows, cap,
                                   estimated)
        if not isinstance(found, str):
            return found
        plan = _choose_for_table(conn, tables, cutoff, batch_size, rows, fraction, cap, first,
                                 estimated, counted)
        return replace(plan, reason=f"{plan.reason} ({found})")
    return _choose_for_table(conn, tables, cutoff, batch_size, rows, fraction, cap, first,
                             estimated, counted)


def _for_dags(conn: Connection, tables: Tables, cutoff: dt.datetime, batch_size: int,
              selection: Selection, rows: int, cap: int,
              estimated: int | None) -> tuple[Plan | str, int | None]:
    """A run narrowed to dag ids: their rows, through the dag_id index, where that reads less
    than a plan of the table would (its expired rows in the steady state, all of it in a
    backlog). The expired rows are counted only as far as decides it, so that a run's reads
    follow the selected rows either way. Returns the plan, or why not with the expired rows
    counted (None: not counted exactly)."""
    from workers.planners import dags, expiry

    selected = dags.estimate_selected(conn, tables, selection, cap=cap)
    if estimated is not None and estimated < cap // 2:
        expired: int | None = estimated  # the steady state by the server's estimate
        about = "about"
    else:
        # A dags plan reads the selected rows twice at least: past that, it reads less.
        bound = min(cap, 2 * selected + 1)
        expired = expiry.count_expired(conn, tables, cutoff, cap=bound)
        if expired >= bound and bound < cap:
            expired = None  # more than twice the selected rows; how many more, below
        about = "exactly" if expired is not None and expired < bound else "at least"
    table_cost = rows if expired is not None and expired >= cap else expired
    counted = expired if about == "exactly" else None
    found = dags.consider(conn, tables, cutoff, batch_size, selection, selected=selected,
                          table_cost=table_cost)
    if isinstance(found, tuple):
        # The dags plan's reads, against the expired rows counted as far as that many.
        plan, cost = found
        bound = min(cap, cost + 1)
        expired = expiry.count_expired(conn, tables, cutoff, cap=bound)
        if expired < bound:
            return (f"dag ids {dags.named(selection)}: {plan.estimated_chunks} chunks of "
                    f"about {selected} rows read each, not under the {expired} expired "
                    f"rows a plan of the table reads"), expired
        about, found = "at least", plan
    if isinstance(found, str):
        return found, counted
    return _auto(found, f"dag ids {dags.named(selection)}: their rows, not the table's "
                        f"({about} {expired} expired of about {rows} rows)"), counted


def _everything() -> Selection:
    from workers.selection import Selection

    return Selection()


def _choose_for_table(conn: Connection, tables: Tables, cutoff: dt.datetime, batch_size: int,
                      rows: int, fraction: float, cap: int, first: expiry.Key,
                      estimated: int | None, counted: int | None) -> Plan:
    """`auto`'s regime test over the whole table: the expiry index in the steady state,
    physical ranges in a backlog."""
    from workers.planners import blocks, expiry
    from workers.planners.blocks import BlocksPlanner
    from workers.planners.ids import IdsPlanner

    if estimated is not None and estimated < cap // 2:
        return _steady(conn, tables, cutoff, batch_size,
                       f"about {estimated} expired of about {rows} rows by the server's "
                       f"estimate (under {fraction:.0%})", estimated=estimated, first=first)
    expired = expiry.count_expired(conn, tables, cutoff, cap=cap) if counted is None else counted
    if expired < cap:
        return _steady(conn, tables, cutoff, batch_size,
                       f"{expired} expired of about {rows} rows (under {fraction:.0%})",
                       counted=expired, first=first)
    if conn.dialect.name == "postgresql":
        try:
            blocks.check(conn, tables)
        except Unsupported as exc:
            return _steady(conn, tables, cutoff, batch_size, f"blocks unavailable ({exc})")
        found = blocks.sample(conn, tables, cutoff)
        return _auto(BlocksPlanner().plan(conn, tables, cutoff, batch_size, found=found),
                     f"backlog: at least {fraction:.0%} of about {rows} rows expired "
                     f"(about {found.expired_fraction:.0%} in a {blocks.SAMPLE_PAGES}-page "
                     f"sample), PostgreSQL heap table")
    if conn.dialect.name in CLUSTERED_BY_ID:
        plan = IdsPlanner().plan(conn, tables, cutoff, batch_size)
        # The table's rows bound the expired ones, whatever the density windows extrapolate
        # over a gap in the ids.
        fill = -(-min(plan.expected_rows, rows) // max(1, batch_size)) if batch_size else 1
        if plan.estimated_chunks > SPARSE_IDS_FACTOR * fill + 8:
            return _steady(conn, tables, cutoff, batch_size,
                           f"ids {plan.start}..{plan.end - 1} would cut "
                           f"{plan.estimated_chunks} chunks for at most {rows} rows "
                           f"(sparse ids)")
        return _auto(plan, f"backlog: at least {fraction:.0%} of about {rows} rows "
                           f"expired; {conn.dialect.name} stores rows in primary-key order")
    return _steady(conn, tables, cutoff, batch_size, "no physical layout known")


def _steady(conn: Connection, tables: Tables, cutoff: dt.datetime, batch_size: int,
            why: str, counted: int | None = None, estimated: int | None = None,
            first: expiry.Key | None = None) -> Plan:
    from workers.planners.expiry import ExpiryPlanner

    return _auto(ExpiryPlanner().plan(conn, tables, cutoff, batch_size, counted=counted,
                                      estimated=estimated, first=first), why)


def _auto(plan: Plan, why: str) -> Plan:
    return replace(plan, reason=f"auto: {why}; {plan.reason}")
