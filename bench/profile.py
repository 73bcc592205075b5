"""Where the time goes: the planners timed and their statements counted (workers.planners.choose
in this process), EXPLAIN (ANALYZE, BUFFERS) of one blocks chunk DELETE, one walk cut and the
upstream loop's statements, and the dry run's cost.

Statements are the ones the workers send, captured from SQLAlchemy's cursor events as they run
(so the plans are the plans the methods get). DELETEs are explained in a transaction that is
rolled back, on a clone: EXPLAIN ANALYZE of a DELETE, even rolled back, marks tuples.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, delete, event, func, select
from sqlalchemy.sql import Executable

from workers import cleanup, planners
from workers.db import db_now, make_engine
from workers.planners import BLOCKS, ChunkRange, walk
from workers.schema import Tables

STATESWEEP = str(Path(sys.executable).with_name("statesweep"))
SETTINGS = ("auto", *planners.PLANNERS)


@contextmanager
def captured(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """(SQL, parameters) of every statement *engine* sends inside the block."""
    seen: list[tuple[str, Any]] = []

    def before(_conn: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


def _explain_sql(conn: Connection, sql: str, params: Any) -> dict[str, Any]:
    lines = [str(r[0]) for r in conn.exec_driver_sql(
        "EXPLAIN (ANALYZE, BUFFERS) " + sql, params).all()]
    # An IN list of thousands of ids is one plan line; keep the plan readable.
    lines = [x if len(x) <= 300 else x[:300] + " …" for x in lines]

    def timing(label: str) -> float:
        return next((float(x.split(":")[1].split()[0]) for x in lines if x.startswith(label)),
                    0.0)

    return {"ms": timing("Execution Time"), "planning_ms": timing("Planning Time"),
            "plan": lines}


def explain(conn: Connection, stmt: Executable) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of a Core statement: execution time and the plan's lines."""
    compiled = stmt.compile(dialect=conn.dialect,  # type: ignore[attr-defined]
                            compile_kwargs={"render_postcompile": True})
    return _explain_sql(conn, str(compiled), compiled.params)


def explain_statements(url: str, tables: Tables, batch: int) -> dict[str, Any]:
    """Plans of one blocks chunk DELETE (the first range of a forced blocks plan), one walk cut
    (the first of a forced walk plan, as walk.cut sends it), and the upstream loop's SELECT and
    its ``DELETE … WHERE id IN (<batch ids>)``."""
    t = tables.task_state
    engine = make_engine(url)
    out: dict[str, Any] = {}
    try:
        with engine.connect() as conn:
            cutoff = db_now(conn)
            blocks = planners.choose(conn, tables, cutoff, batch, BLOCKS)
            conn.rollback()
            if not blocks.empty:
                rng = ChunkRange(BLOCKS, blocks.start, min(blocks.end, blocks.start + blocks.size))
                out["blocks_chunk_delete"] = explain(
                    conn, cleanup.delete_statement(tables, rng, cutoff))
                out["blocks_chunk_delete"]["range"] = f"pages {rng.encode()}"
                conn.rollback()
            plan = planners.choose(conn, tables, cutoff, batch, "walk")
            conn.rollback()
            if not plan.empty:
                with captured(engine) as seen:
                    walk.cut(conn, tables, cutoff, plan.start, plan.end, batch)
                conn.rollback()
                out["walk_cut"] = _explain_sql(conn, *seen[-1])
                conn.rollback()
            upstream = select(t.c.id).where(t.c.expires_at < func.now()).limit(batch)
            batch_ids = list(conn.execute(upstream).scalars())
            out["upstream_select"] = explain(conn, upstream)
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


def time_planning(url: str, tables: Tables, batch: int, repeats: int = 3) -> dict[str, Any]:
    """workers.planners.choose for auto and each planner forced, on one autocommit connection
    as the coordinator plans: wall ms (first call and best of *repeats*), statements sent, the
    plan it made, and the peak of Python allocations (flat when planning is O(1))."""
    engine = make_engine(url, connect_args={"application_name": "bench_planning"})
    out: dict[str, Any] = {}
    try:
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            cutoff = db_now(conn)
            for setting in SETTINGS:
                times: list[float] = []
                tracemalloc.start()
                for _ in range(repeats):
                    with captured(engine) as seen:
                        t0 = time.perf_counter()
                        plan = planners.choose(conn, tables, cutoff, batch, setting)
                        times.append((time.perf_counter() - t0) * 1000)
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                out[setting] = {
                    "ms_first": round(times[0], 2), "ms_best": round(min(times), 2),
                    "statements": len(seen), "planner": plan.planner, "reason": plan.reason,
                    "estimated_chunks": plan.estimated_chunks,
                    "expected_rows": plan.expected_rows, "python_peak_kib": round(peak / 1024, 1)}
    finally:
        engine.dispose()
    return out


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
