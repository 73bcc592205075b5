"""Where the time goes: EXPLAIN (ANALYZE, BUFFERS) of the statements each method runs, the
coordinator's planning timed step by step in this process, and the dry run's cost.

The statements are built exactly as workers.cleanup and bench.methods build them, compiled by
SQLAlchemy for PostgreSQL, so the plans are the plans the methods get. The chunk DELETE is
explained inside a transaction that is rolled back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, func, select
from sqlalchemy.sql import Executable

from bench.observe import percentile
from workers import cleanup
from workers.db import db_now, make_engine
from workers.schema import Tables

STATESWEEP = str(Path(sys.executable).with_name("statesweep"))


def explain(conn: Connection, stmt: Executable) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of *stmt*: its execution time and the plan as text lines."""
    compiled = stmt.compile(dialect=conn.dialect,  # type: ignore[attr-defined]
                            compile_kwargs={"render_postcompile": True})
    lines = [str(r[0]) for r in conn.exec_driver_sql(
        "EXPLAIN (ANALYZE, BUFFERS) " + str(compiled), compiled.params).all()]
    # An IN list of thousands of ids is one plan line; keep the plan readable.
    lines = [x if len(x) <= 300 else x[:300] + " …" for x in lines]

    def timing(label: str) -> float:
        return next((float(x.split(":")[1].split()[0]) for x in lines if x.startswith(label)),
                    0.0)

    return {"ms": timing("Execution Time"), "planning_ms": timing("Planning Time"),
            "plan": lines}


def explain_statements(url: str, tables: Tables, batch: int) -> dict[str, Any]:
    """Plans of the planning step and a chunk DELETE, and of the upstream loop's SELECT and
    its ``DELETE … WHERE id IN (<batch ids>)``."""
    t = tables.task_state
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            cutoff = db_now(conn)
            expired = t.c.expires_at < cutoff
            first = int(conn.execute(select(func.min(t.c.id)).where(expired)).scalar_one())
            step = (select(t.c.id).where(t.c.id >= first, expired).order_by(t.c.id)
                    .limit(2).offset(batch - 1))
            ids = conn.execute(step).scalars().all()
            hi = int(ids[0]) if ids else first
            upstream = select(t.c.id).where(t.c.expires_at < func.now()).limit(batch)
            batch_ids = list(conn.execute(upstream).scalars())
            # The same span cut on the primary key alone (an index-only scan, no heap visits):
            # what a planner that cut ranges of ids rather than of expired rows would pay.
            pk_only = (select(t.c.id).where(t.c.id >= first).order_by(t.c.id)
                       .limit(1).offset(max(0, hi - first)))
            out = {"planning_step": explain(conn, step),
                   "planning_step_pk_only": explain(conn, pk_only),
                   "upstream_select": explain(conn, upstream)}
            conn.rollback()
            out["chunk_delete"] = explain(
                conn, delete(t).where(t.c.id.between(first, hi), expired))
            conn.rollback()
            in_list = delete(t).where(t.c.id.in_(batch_ids))
            out["upstream_delete"] = explain(conn, in_list)
            conn.rollback()
            # The same DELETE as the loop sends it: SQLAlchemy renders one bound parameter per
            # id, psycopg adapts each; the gap to EXPLAIN's server time is the client's cost.
            t0 = time.perf_counter()
            conn.execute(in_list)
            out["upstream_delete"]["client_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            conn.rollback()
    finally:
        engine.dispose()
    return out


def time_planning(url: str, tables: Tables, batch: int) -> dict[str, Any]:
    """workers.cleanup.plan_chunks over the whole table in this process: total and per-step
    time, and the peak of Python allocations while planning (flat when memory is O(1))."""
    engine = make_engine(url, connect_args={"application_name": "bench_planning"})
    try:
        with engine.connect() as conn:
            cutoff = db_now(conn)
        steps: list[float] = []
        tracemalloc.start()
        t0 = last = time.perf_counter()
        for _chunk in cleanup.plan_chunks(engine, tables, cutoff, batch):
            now = time.perf_counter()
            steps.append((now - last) * 1000)
            last = now
        total = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        engine.dispose()
    return {
        "chunks": len(steps), "seconds": round(total, 3),
        "step_ms_p50": round(percentile(steps, 50), 2),
        "step_ms_max": round(max(steps, default=0.0), 2),
        "python_peak_kib": round(peak / 1024, 1),
    }


def cli_has_dry_run() -> bool:
    try:
        out = subprocess.run([STATESWEEP, "cleanup", "--help"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "--dry-run" in out.stdout


def time_dry_run(url: str, tables: Tables, batch: int, env: dict[str, str]) -> dict[str, Any]:
    """``statesweep cleanup --dry-run`` as a user runs it (process start included) when the CLI
    has it, and workers.cleanup.summarise_expired (its queries alone) in this process."""
    engine = make_engine(url)
    try:
        cutoff = cleanup.read_cutoff(engine)
        t0 = time.perf_counter()
        summary = cleanup.summarise_expired(engine, tables, cutoff, batch)
        out: dict[str, Any] = {
            "summarise_expired_s": round(time.perf_counter() - t0, 3),
            "expired_rows": summary.expired_rows, "chunks": summary.chunks,
        }
    finally:
        engine.dispose()
    if not cli_has_dry_run():
        out["cli_s"] = None
        out["cli_note"] = "statesweep cleanup --dry-run not available yet; timed the function"
        return out
    child = {k: v for k, v in os.environ.items() if not k.startswith(("STATESWEEP_", "AIRFLOW__"))}
    t0 = time.perf_counter()
    done = subprocess.run([STATESWEEP, "cleanup", "--dry-run"], env={**child, **env},
                          capture_output=True, text=True, timeout=600)
    out["cli_s"] = round(time.perf_counter() - t0, 3)
    out["cli_exit"] = done.returncode
    if done.returncode != 0:
        out["cli_note"] = done.stderr.strip()[-300:]
    return out
