"""``python -m bench.steady``: the steady state at production cadence, every method side by side.

    python -m bench.steady --rows 3000000 --cycles 10 --interval 15   # issue 20's targets
    python -m bench.steady --quick                                    # 200k rows, 3 cycles

Rows expire continuously, about 1% of the table per interval (bench.steady_data), a writer
upserts beside the runs, and every interval one cleanup runs: ``upstream`` (Airflow's loop:
select ids limit B; delete; commit) and ``single`` (one DELETE) from this process, statesweep
as an operator runs it, ``statesweep cleanup --wait`` against its running workers. Airflow's
loop reads its cutoff once per run here, as statesweep does: with ``now()`` per SELECT it chases
the rows expiring while it runs and, at 3M rows, never ended (bench.methods.run_upstream).
Methods run one after the other, each on its own database built from the same recipe with its
own anchor (the moment its rows start expiring), so each finds the same rows expired at the
same cycle; the starting pages are listed per method to show they match. No VACUUM after the
build: only autovacuum, as in production.

Per run: wall (statesweep: the CLI's, and the run record's), CPU of every PostgreSQL process
(bench.observe.postgres_cpu_seconds, exact across backends that end), rows read per row deleted
(pg_stat_user_tables' seq_tup_read + idx_tup_fetch of task_state), expired rows left, the plan
(planner, reason, plan_ms from the coordinator's cleanup_run_started), the writer's p99 and the
table's pages. Backends flush their table statistics at most once a second and an idle one up
to 10 s later, so the counters of cycle k are read just before run k+1 (after the last run, one
interval later): each window is boundary to boundary, and the writer's own reads over it (its
rate measured alone before the first cycle) are subtracted. ``stats_coverage`` (rows the
counters saw deleted / rows deleted) says whether a window caught its whole run.
Outputs: bench/results/steady_<rows>.{json,md}; the markdown and the targets go to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench import data, names, steady_data, steady_report
from bench.measure import (
    add_service_args,
    load,
    machine_cpu_seconds,
    progress,
    run_baseline,
    stop,
    tag_of,
    warm_fleet,
    writer_stats,
)
from bench.methods import run_upstream
from bench.names import Method
from bench.observe import postgres_cpu_seconds
from bench.sweep import Fleet, worker_env
from bench.worker_logs import log_events
from bench.writer import Writer, start_writer
from workers.db import db_now, make_engine
from workers.schema import build_tables

DEFAULT_METHODS = "upstream,single,statesweep_1w,statesweep_2w"
STATESWEEP = str(Path(sys.executable).with_name("statesweep"))
#: Rows that expire per interval, as a share of the table.
PER_INTERVAL = 0.01


#: Intervals a late setup may move the cycles on by (bench/steady_data builds rows expiring
#: that much longer).
LATE_INTERVALS = 30

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.steady", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, help="task_state rows (default 3,000,000; quick 200,000)")
    p.add_argument("--cycles", type=int, help="runs per method (default 10; quick 3)")
    p.add_argument("--interval", type=float, help="seconds between runs (default 15; quick 6)")
    p.add_argument("--batch", type=int, default=10_000, help="rows per chunk / per loop step")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated (bench.names)")
    p.add_argument("--writer-rate", type=float, default=200.0, help="writer upserts per second")
    p.add_argument("--quick", action="store_true", help="small and short, for development")
    p.add_argument("--run-state", action="store_true",
                   help="give dag_run Airflow's state column (every run finished), so chunks "
                        "check protection; compare statesweep_2w with statesweep_unprotected_2w")
    add_service_args(p, "statesweep_steady")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    args = p.parse_args(argv)
    quick = (200_000, 3, 6.0) if args.quick else (3_000_000, 10, 15.0)
    args.rows = args.rows or quick[0]
    args.cycles = args.cycles or quick[1]
    args.interval = args.interval or quick[2]
    try:
        args.method_list = names.parse_methods([n for n in args.methods.split(",") if n], [])
    except ValueError as exc:
        p.error(str(exc))
    if args.rows < 10_000 or args.cycles < 1 or args.interval <= 0:
        p.error("--rows must be >= 10000, --cycles >= 1, --interval > 0")
    args.chunk_rate_limit = ""
    return args


def run_statesweep(fleet: Fleet, timeout: float) -> dict[str, Any]:
    """``statesweep cleanup --wait`` against the running fleet, as an operator runs it."""
    out = subprocess.run([STATESWEEP, "cleanup", "--wait", "--format", "json"],
                         env={**os.environ, **fleet.env}, capture_output=True, text=True,
                         timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"statesweep cleanup exited {out.returncode}: {out.stderr[-2000:]}")
    record = json.loads(out.stdout)
    started = next((e for e in log_events(fleet.control.log_path, record["run_id"])
                    if e["event"] == "cleanup_run_started"), {})
    return {"rows": int(record["rows_deleted"]), "record_seconds": record["duration"],
            "chunks": record["chunks_done"], "planner": record["planner"],
            "planner_reason": record["planner_reason"], "plan_ms": started.get("plan_ms"),
            "run_id": record["run_id"]}


def one_run(args: argparse.Namespace, method: Method, url: str, fleet: Fleet | None,
            writer: Writer) -> dict[str, Any]:
    began = time.time()
    machine0, pg0, t0 = machine_cpu_seconds(), postgres_cpu_seconds(), time.perf_counter()
    if fleet is not None:
        run = run_statesweep(fleet, args.timeout)
    else:
        result = (run_upstream(url, build_tables("seed"), args.batch, fixed_cutoff=True)
                  if method.name == "upstream" else run_baseline(method.name, args, url))
        run = {"rows": result.rows, "chunks": len(result.txn_ms)}
    wall = time.perf_counter() - t0
    pg, machine, ended = postgres_cpu_seconds() - pg0, machine_cpu_seconds() - machine0, time.time()
    left = steady_data.expired_before(url, "task_state", dt.datetime.fromtimestamp(began, dt.UTC))
    return {**run, "wall_s": round(wall, 3), "pg_cpu_s": round(pg, 3),
            "machine_cpu_s": round(machine, 3), "expired_left": left,
            "writer": writer_stats(writer.latencies(began, ended), ended - began),
            "started": began}


def reads(before: dict[str, int], after: dict[str, int], writer_per_s: dict[str, float],
          seconds: float, rows: int) -> dict[str, Any]:
    """One window's counters, less the writer's share, per row deleted."""
    d = {k: after[k] - before[k] - writer_per_s.get(k, 0.0) * seconds
         for k in ("rows_read", "heap_blocks", "index_blocks")}
    return {"rows_read": round(d["rows_read"]),
            "rows_read_per_deleted": round(d["rows_read"] / rows, 2) if rows else None,
            "heap_blocks_per_deleted": round(d["heap_blocks"] / rows, 3) if rows else None,
            "index_blocks_per_deleted": round(d["index_blocks"] / rows, 3) if rows else None,
            "stats_coverage": round((after["deleted"] - before["deleted"]) / rows, 3)
            if rows else None, "pages": after["pages"], "dead_tuples": after["dead"],
            "autovacuums": after["autovacuums"] - before["autovacuums"]}


def measure_method(args: argparse.Namespace, method: Method, tmp: Path,
                   setup_s: float) -> tuple[dict[str, Any], float]:
    """Build, then *args.cycles* runs on the interval; returns the method's row and how long
    its setup (fleet, build, writer) took, for the next method's anchor."""
    tag = tag_of(method.name)
    url = data.database_url(args.pg_url, args.database)
    env = worker_env(url, args.redis_url, f"{tmp.name}-{tag}", args.batch, "", method.env())
    tables = build_tables("seed")
    fleet, writer = None, None
    t_setup = time.perf_counter()
    try:
        if method.is_sweep:
            fleet, _ = warm_fleet(args, method, env, tmp)
        data.recreate(args.pg_url, args.database)
        engine = make_engine(url)
        with engine.connect() as conn:
            now = db_now(conn)
        engine.dispose()
        # The anchor leaves room for the rest of the setup and the writer's baseline window.
        anchor = now + dt.timedelta(seconds=setup_s + args.interval)
        per_interval = int(args.rows * PER_INTERVAL)
        # Rows expire for LATE_INTERVALS more than the cycles need: a setup that overruns its
        # guess (a loaded host) moves the cycles on, and they still find 1% each.
        built = steady_data.build(url, tables, args.rows, per_interval,
                                  per_interval * (args.cycles + 3 + LATE_INTERVALS),
                                  args.interval, anchor, now)
        if args.run_state:
            data.add_run_state(url)
        progress(f"{method.name}: built {built['pages']:,} pages, anchor in "
                 f"{(anchor - dt.datetime.now(dt.UTC)).total_seconds():.0f} s")
        if fleet is not None:
            fleet.reconnect()
        writer = start_writer(url, data.writer_keys(url), args.writer_rate,
                              tmp / f"writer-{tag}.txt")
        writer.resume()
        setup = time.perf_counter() - t_setup
        boundaries = [anchor.timestamp() + k * args.interval for k in range(1, args.cycles + 2)]
        # The writer alone until the first boundary: its own reads per second.
        time.sleep(1)
        w0, w_start = steady_data.table_stats(url), time.time()
        late = w_start - (boundaries[0] - 1)
        if late > 0:
            # Boundaries in the past would run the cycles back to back (each finding nothing
            # after the first): move them on by whole intervals; the first run finds more.
            shift = args.interval * min(LATE_INTERVALS, int(late // args.interval) + 1)
            boundaries = [b + shift for b in boundaries]
            progress(f"{method.name}: setup late by {late:.1f} s; the first run finds more")
        time.sleep(max(1.0, boundaries[0] - 0.2 - time.time()))
        stats, at = steady_data.table_stats(url), time.time()
        writer_per_s = {k: (stats[k] - w0[k]) / (at - w_start) for k in stats}
        idle = writer_stats(writer.latencies(w_start, at), at - w_start)
        cycles: list[dict[str, Any]] = []
        for k in range(args.cycles):
            time.sleep(max(0.0, boundaries[k] - time.time()))
            run = one_run(args, method, url, fleet, writer)
            time.sleep(max(0.0, boundaries[k + 1] - 0.2 - time.time()))
            after, now_s = steady_data.table_stats(url), time.time()
            run.update(reads(stats, after, writer_per_s, now_s - at, run["rows"]))
            stats, at = after, now_s
            run["cycle"] = k + 1
            cycles.append(run)
            progress(f"{method.name} cycle {k + 1}: {run['rows']:,} rows in {run['wall_s']:.2f} s,"
                     f" pg cpu {run['pg_cpu_s']:.2f} s, reads/row {run['rows_read_per_deleted']},"
                     f" left {run['expired_left']}, planner {run.get('planner', '-')}")
    finally:
        stop(args, env, fleet, writer)
    return {"name": method.name, "workers": method.workers, "planner_setting": method.planner,
            "built": built, "writer_alone": idle, "writer_reads_per_s": writer_per_s,
            "setup_late_s": round(max(0.0, late), 1), "cycles": cycles}, setup


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    tmp = args.out / "tmp" / uuid.uuid4().hex[:8]
    tmp.mkdir(parents=True, exist_ok=True)
    load_before = load()
    progress(f"rows {args.rows:,}, {args.cycles} cycles every {args.interval:g} s, "
             f"load {load_before}, logs in {tmp}")
    methods: list[dict[str, Any]] = []
    # A first guess at the setup (fleet warm-up, build); later methods use the last one's.
    setup_s = 30 + args.rows / 25_000
    with data.scratch_databases(args.pg_url, args.database) as template:
        engine = make_engine(template)
        with engine.connect() as conn:
            now = db_now(conn)
            version = str(conn.exec_driver_sql("SHOW server_version").scalar_one())
        engine.dispose()
        warm = data.database_url(args.pg_url, f"{args.database}_warm")
        data.build(warm, build_tables("seed"), names.seed_spec(data.WARM_ROWS, None), now)
        if args.run_state:
            data.add_run_state(warm)
        for method in args.method_list:
            row, setup = measure_method(args, method, tmp, setup_s)
            setup_s = setup * 1.2 + 5
            methods.append(row)
    command = "python -m bench.steady " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))
    results: dict[str, Any] = {
        "meta": {"rows": args.rows, "cycles": args.cycles, "interval": args.interval,
                 "batch": args.batch, "writer_rate": args.writer_rate, "command": command,
                 "started": started.isoformat(timespec="seconds"), "load_before": load_before,
                 "load_after": load(), "cpus": os.cpu_count(), "postgres": version,
                 "run_state": args.run_state},
        "methods": methods}
    steady_report.summarise(results)
    stem = f"steady_{args.rows}" + ("_run_state" if args.run_state else "")
    paths = steady_report.write_outputs(results, args.out, stem)
    progress(f"wrote {', '.join(str(p) for p in paths)}")
    print(steady_report.markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
