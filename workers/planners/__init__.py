"""Planners: named strategies that split a run's expired rows into chunks without reading rows.

=========  ==========================================  =====================================
name       chunks are                                  serves
=========  ==========================================  =====================================
blocks     heap page (ctid) ranges, last open-ended    PostgreSQL >= 14, heap tables
ids        primary-key ranges by arithmetic            InnoDB and SQLite (rows cluster by id)
walk       id ranges of exactly B expired rows, cut    any database; sparse expired rows
           by an index walk as the window has room
=========  ==========================================  =====================================

``STATESWEEP_PLANNER=auto`` picks one from a fixed-cost estimate and says why; a planner forced
by name that this database cannot serve is a settings error before anything is deleted.
Correctness never rests on the plan: every DELETE re-checks ``expires_at < cutoff``, so a stale
or approximate plan can leave rows for the next run but never deletes a live one.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

from sqlalchemy import Connection

from workers.exceptions import SettingsError
from workers.planners import blocks
from workers.planners.base import BLOCKS, IDS, KINDS, WALK, ChunkRange, Plan, Planner, Unsupported
from workers.planners.blocks import BlocksPlanner
from workers.planners.ids import IdsPlanner
from workers.planners.walk import WalkPlanner
from workers.schema import Tables

__all__ = ["BLOCKS", "IDS", "KINDS", "PLANNERS", "WALK", "ChunkRange", "Plan", "Planner",
           "choose"]

PLANNERS: dict[str, Planner] = {p.name: p for p in (BlocksPlanner(), IdsPlanner(),
                                                     WalkPlanner())}
CHOICES = ("auto", *PLANNERS)
#: Below this expired fraction `auto` walks the index rather than scan every page. Measured with
#: `python -m bench.run --rows 5000000 --expired-percent 1` (bench/results/): at 1% expired,
#: block ranges still ran 2.1x faster than the walk (34k against 16k rows/s, 2 workers) and held
#: no long transaction (the walk's id ranges each read ~1M index entries: 674 ms), so the
#: crossover lies below 1%; 0.2% keeps the walk for the sparse tables where a scan of every
#: page is clearly the larger cost.
SPARSE_FRACTION = 0.002
CLUSTERED_BY_ID = ("mysql", "mariadb", "sqlite")


def choose(conn: Connection, tables: Tables, cutoff: dt.datetime, batch_size: int,
           setting: str = "auto") -> Plan:
    """The plan of one run, by the planner *setting* names (or the one `auto` picks)."""
    if setting != "auto":
        planner = PLANNERS[setting]
        try:
            planner.check(conn, tables)
        except Unsupported as exc:
            raise SettingsError(f"STATESWEEP_PLANNER={setting!r}: this database cannot use "
                                f"it: {exc}; use auto, or one of {', '.join(PLANNERS)}") from None
        plan = planner.plan(conn, tables, cutoff, batch_size)
        return replace(plan, reason=f"set by STATESWEEP_PLANNER; {plan.reason}")
    if conn.dialect.name == "postgresql":
        try:
            blocks.check(conn, tables)
        except Unsupported as exc:
            return _auto(WalkPlanner().plan(conn, tables, cutoff, batch_size),
                         f"blocks unavailable ({exc})")
        found = blocks.sample(conn, tables, cutoff)
        if found.pages and found.expired_fraction < SPARSE_FRACTION:
            return _auto(WalkPlanner().plan(conn, tables, cutoff, batch_size),
                         f"about {found.expired_fraction:.1%} of rows expired (under "
                         f"{SPARSE_FRACTION:.1%}): the index finds them for less than a scan "
                         f"of {found.pages} pages")
        return _auto(BlocksPlanner().plan(conn, tables, cutoff, batch_size, found=found),
                     "PostgreSQL heap table")
    if conn.dialect.name in CLUSTERED_BY_ID:
        return _auto(IdsPlanner().plan(conn, tables, cutoff, batch_size),
                     f"{conn.dialect.name} stores rows in primary-key order")
    return _auto(WalkPlanner().plan(conn, tables, cutoff, batch_size), "no physical layout known")


def _auto(plan: Plan, why: str) -> Plan:
    return replace(plan, reason=f"auto: {why}; {plan.reason}")
