"""An experiment, not statesweep code: what each planner's O(1) plan gets right, and what the
walk pays later.

For ``blocks`` and ``ids`` the plan is all the planning there is; the question is how good its
estimates are (expected rows and chunks against the true expired count), since chunk sizes come
from them. ``walk`` plans in two probes but pays one index walk per chunk as the window has room
(workers.window.Sender.cut_more): the first ``CUTS`` cuts are timed here (read-only, nothing is
deleted, so later cuts walk the same dense prefix) and extrapolated to the run's chunk count.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine

from bench.observe import percentile
from workers import cleanup, planners
from workers.planners import walk
from workers.schema import Tables

CUTS = 20


def walk_cuts(engine: Engine, tables: Tables, batch: int, cuts: int = CUTS) -> dict[str, Any]:
    """Time the walk's first *cuts* cuts from its plan, on one autocommit connection."""
    cutoff = cleanup.read_cutoff(engine)
    steps: list[float] = []
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        plan = planners.choose(conn, tables, cutoff, batch, "walk")
        lo: int | None = plan.start
        while lo is not None and len(steps) < cuts and not plan.empty:
            t0 = time.perf_counter()
            _, lo = walk.cut(conn, tables, cutoff, lo, plan.end, batch)
            steps.append((time.perf_counter() - t0) * 1000)
    return {"cuts": len(steps), "ms_p50": round(percentile(steps, 50), 2),
            "ms_max": round(max(steps, default=0.0), 2), "ms_sum": round(sum(steps), 1)}


def compare(engine: Engine, tables: Tables, batch: int,
            planning: dict[str, Any]) -> dict[str, Any]:
    """Each forced planner's estimates against the truth, and the walk's cut cost for a run.
    *planning* is profile.time_planning's result (the plans already made)."""
    cutoff = cleanup.read_cutoff(engine)
    expired = cleanup.count_expired(engine, tables, cutoff)
    ideal = -(-expired // batch) if batch else 1
    out: dict[str, Any] = {"expired_rows": expired, "ideal_chunks": ideal}
    for name in planners.PLANNERS:
        plan = planning.get(name)
        if plan is None:
            continue
        estimate = plan["expected_rows"]
        out[name] = {
            "estimated_chunks": plan["estimated_chunks"],
            # walk cuts exactly batch expired rows a chunk and estimates no rows
            "expected_rows": estimate,
            "rows_error": round(estimate / expired - 1, 3) if expired and estimate else None,
        }
    cuts = walk_cuts(engine, tables, batch)
    cuts["run_ms_estimate"] = round(cuts["ms_p50"] * ideal, 1)
    out["walk_cuts"] = cuts
    return out
