"""The baselines statesweep is measured against, run from this process.

``single``        one ``DELETE … WHERE expires_at < now()``: the fastest way to delete, and one
                  transaction as long as the whole job.
``upstream``      the AIP-103 loop: ``SELECT id … WHERE expires_at < now() LIMIT B``, then
                  ``DELETE … WHERE id IN (…)``, commit, repeat until the SELECT finds nothing.
``sql_chunks_Nt`` statesweep's own plan and chunk transactions (the blocks planner, then
                  ``workers.cleanup.delete_range`` per chunk) on N threads of this process, with
                  no Celery, broker or run store: what PostgreSQL allows for chunked deletes on
                  this machine, so the distance to a statesweep run is the cost of the pipeline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select

from workers import cleanup, planners
from workers.db import make_engine
from workers.planners import BLOCKS, ChunkRange, Plan
from workers.schema import Tables


@dataclass
class MethodResult:
    name: str
    rows: int = 0
    seconds: float = 0.0
    #: longest transaction measured by the method itself (ms), and how it was measured
    longest_txn_ms: float = 0.0
    longest_txn_source: str = ""
    #: per-transaction durations (ms): upstream iterations, statesweep chunks
    txn_ms: list[float] = field(default_factory=list)
    started_wall: float = 0.0
    ended_wall: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _ended(result: MethodResult, t0: float, txn_source: str) -> None:
    """Close a method timed from *t0* whose transactions are in ``txn_ms``."""
    result.seconds = time.perf_counter() - t0
    result.ended_wall = time.time()
    result.longest_txn_ms = max(result.txn_ms, default=0.0)
    result.longest_txn_source = txn_source


def run_single(url: str, tables: Tables) -> MethodResult:
    t = tables.task_state
    engine = make_engine(url, connect_args={"application_name": "bench_single"})
    result = MethodResult("single", started_wall=time.time())
    t0 = time.perf_counter()
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
            result.rows = int(conn.execute(delete(t).where(t.c.expires_at < func.now()))
                              .rowcount)
    finally:
        engine.dispose()
    result.seconds = time.perf_counter() - t0
    result.ended_wall = time.time()
    result.longest_txn_ms = result.seconds * 1000
    result.longest_txn_source = "the one transaction, timed in the client"
    result.txn_ms = [result.longest_txn_ms]
    return result


def run_upstream(url: str, tables: Tables, batch: int,
                 fixed_cutoff: bool = False) -> MethodResult:
    """The loop; with *fixed_cutoff*, ``now()`` is read once before it rather than by every
    SELECT. Rows that expire continuously need that: with ``now()`` per transaction the loop
    chases rows expiring while it runs, and ends only once it deletes faster than they expire
    (bench.steady, 3M rows, 2,000 rows/s expiring: it had not ended after 80 s)."""
    t = tables.task_state
    engine = make_engine(url, connect_args={"application_name": "bench_upstream"})
    result = MethodResult("upstream", started_wall=time.time())
    select_ms: list[float] = []
    delete_ms: list[float] = []
    t0 = time.perf_counter()
    try:
        cutoff = cleanup.read_cutoff(engine) if fixed_cutoff else func.now()
        while True:
            began = time.perf_counter()
            with engine.begin() as conn:
                ids = conn.execute(
                    select(t.c.id).where(t.c.expires_at < cutoff).limit(batch)
                ).scalars().all()
                selected = time.perf_counter()
                if not ids:
                    break
                result.rows += int(conn.execute(delete(t).where(t.c.id.in_(ids))).rowcount)
                deleted = time.perf_counter()
            result.txn_ms.append((time.perf_counter() - began) * 1000)
            select_ms.append((selected - began) * 1000)
            delete_ms.append((deleted - selected) * 1000)
    finally:
        engine.dispose()
    _ended(result, t0, "each SELECT+DELETE+COMMIT, timed in the client")
    result.detail = {
        "iterations": len(result.txn_ms),
        "select_ms_total": round(sum(select_ms), 1),
        "delete_ms_total": round(sum(delete_ms), 1),
        "select_ms_first": round(select_ms[0], 1) if select_ms else 0.0,
        "select_ms_last": round(select_ms[-1], 1) if select_ms else 0.0,
        "select_ms_max": round(max(select_ms, default=0.0), 1),
        "delete_ms_max": round(max(delete_ms, default=0.0), 1),
    }
    return result


def plan_ranges(plan: Plan) -> Iterator[ChunkRange]:
    """A blocks plan's chunks at its first size, the last one open-ended, as the run store cuts
    them before any resize."""
    lo = plan.start
    while lo < plan.end:
        hi = lo + plan.size
        yield ChunkRange(BLOCKS, lo, hi if hi < plan.end else None)
        lo = hi


def run_sql_chunks(url: str, tables: Tables, batch: int, threads: int) -> MethodResult:
    """The blocks plan deleted chunk by chunk on *threads* threads, each chunk in its own
    transaction through the statement statesweep's chunk task runs; planning is timed too."""
    name = f"sql_chunks_{threads}t"
    engine = make_engine(url, connect_args={"application_name": "bench_sql_chunks"},
                         pool_size=threads)
    result = MethodResult(name, started_wall=time.time())
    lock = threading.Lock()
    failures: list[BaseException] = []
    t0 = time.perf_counter()
    try:
        cutoff = cleanup.read_cutoff(engine)
        with engine.connect() as conn:
            plan = planners.choose(conn, tables, cutoff, batch, "blocks")
        ranges = plan_ranges(plan)

        def work() -> None:
            try:
                while True:
                    with lock:
                        rng = next(ranges, None)
                    if rng is None:
                        return
                    began = time.perf_counter()
                    rows = cleanup.delete_range(engine, tables, rng, cutoff)
                    with lock:
                        result.rows += rows
                        result.txn_ms.append((time.perf_counter() - began) * 1000)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the bench thread
                failures.append(exc)

        pool = [threading.Thread(target=work, name=f"{name}-{i}") for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        if failures:
            raise RuntimeError(f"{name}: a chunk failed: {failures[0]!r}")
    finally:
        engine.dispose()
    _ended(result, t0, "each chunk's transaction, timed in the client")
    result.detail = {"chunks": len(result.txn_ms), "threads": threads,
                     "planner_reason": plan.reason}
    return result
