"""``python -m bench.plan_after_run``: what a plan costs right after a big run, with no VACUUM
in between, on PostgreSQL and MariaDB (issue 20: plan <= 20 ms; MariaDB on 2M rows).

Per database: a fresh table of ``--rows`` rows in the default mix (about half expired),
ANALYZEd; one big run (``workers.chunk.run_local``, ``auto``, a memory:// run store: the
planners' SQL with no broker in it); then, with no VACUUM, ``planners.choose`` timed
``--repeats`` times (the empty run's plan: nothing expired). Then a steady step: 1% of the
rows are made to expire (their expires_at moved to a second ago), the plan of that run is
timed, the run deletes them, and the empty plan after it is timed again. The first plan after
each run is listed apart from the rest: it is the one that meets the run's dead index entries.
Writes bench/results/plan_after_run.{json,md}; the markdown goes to stdout too.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, text

from bench import crossover_mariadb, data
from bench.measure import RESULTS, load, progress
from tests.cleanup_runs import memory_store
from workers import planners
from workers.chunk import run_local
from workers.db import db_now, make_engine
from workers.runs import RunStore
from workers.schema import Tables, build_tables, upgrade
from workers.seed import SeedSpec, seed
from workers.settings import Settings

TARGET_MS = 20.0
DATABASE = "statesweep_plan_after_run"


def drop(dialect: str, admin_url: str) -> None:
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    quoted = f'"{DATABASE}" WITH (FORCE)' if dialect == "postgresql" else f"`{DATABASE}`"
    try:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {quoted}"))
    finally:
        admin.dispose()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.plan_after_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--databases", default="postgresql,mariadb")
    p.add_argument("--pg-url", default=os.environ.get(
        "STATESWEEP_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    p.add_argument("--mariadb-url", default=os.environ.get(
        "STATESWEEP_BENCH_MARIADB_URL", "mysql://root@127.0.0.1:3306/test"))
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def plan_ms(engine: Engine, tables: Tables, batch: int) -> tuple[float, str]:
    """One `auto` plan as the coordinator makes it (an autocommit connection), timed."""
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        cutoff = db_now(conn)
        t0 = time.perf_counter()
        plan = planners.choose(conn, tables, cutoff, batch)
        return (time.perf_counter() - t0) * 1000, plan.reason


def plans(engine: Engine, tables: Tables, batch: int, repeats: int) -> dict[str, Any]:
    times, reason = [], ""
    for _ in range(repeats):
        ms, reason = plan_ms(engine, tables, batch)
        times.append(ms)
    return {"first_ms": round(times[0], 1), "median_rest_ms": round(
        statistics.median(times[1:] or times), 1), "max_ms": round(max(times), 1),
        "reason": reason}


def run(settings: Settings, engine: Engine, tables: Tables, store: RunStore,
        batch: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    summary = run_local(settings, engine, tables, store, batch_size=batch)
    record = store.get(summary.run_id)
    return {"wall_s": round(time.perf_counter() - t0, 2),
            "rows": record.rows_deleted if record else 0,
            "planner": record.planner if record else "", "plan_reason":
            record.planner_reason if record else summary.reason}


def measure(dialect: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    tables = build_tables("seed")
    engine = make_engine(url)
    try:
        upgrade(engine, "seed")
        with engine.connect() as conn:
            now = db_now(conn)
        t0 = time.perf_counter()
        seed(engine, tables, SeedSpec(rows=args.rows), now)
        analyze = "ANALYZE task_state" if dialect == "postgresql" else "ANALYZE TABLE task_state"
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(text(analyze)).close()
        progress(f"{dialect}: seeded {args.rows:,} rows in {time.perf_counter() - t0:.0f} s")
        settings = Settings.from_env({"STATESWEEP_DATABASE_URL": url,
                                      "STATESWEEP_RUN_STORE_URL": "memory://",
                                      "STATESWEEP_TABLE_NAMING": "seed",
                                      "STATESWEEP_CLEANUP_BATCH_SIZE": str(args.batch)})
        settings = dataclasses.replace(settings, planner="auto")
        store = memory_store()
        big = run(settings, engine, tables, store, args.batch)
        progress(f"{dialect}: big run {big['rows']:,} rows in {big['wall_s']} s "
                 f"({big['planner']})")
        after_big = plans(engine, tables, args.batch, args.repeats)
        t = tables.task_state
        with engine.begin() as conn:
            cut = db_now(conn)
            conn.execute(t.update().where(t.c.id % 101 == 7)
                         .values(expires_at=cut - dt.timedelta(seconds=1)))
        with engine.connect() as conn:
            made = conn.execute(select(func.count()).select_from(t).where(
                t.c.expires_at < db_now(conn))).scalar_one()
        progress(f"{dialect}: {made:,} rows made to expire")
        steady_plan = plans(engine, tables, args.batch, 1)
        steady = run(settings, engine, tables, store, args.batch)
        progress(f"{dialect}: steady run {steady['rows']:,} rows in {steady['wall_s']} s "
                 f"({steady['planner']})")
        after_steady = plans(engine, tables, args.batch, args.repeats)
        return {"database": dialect, "big_run": big, "plan_after_big": after_big,
                "steady_plan": steady_plan, "steady_run": steady,
                "plan_after_steady": after_steady}
    finally:
        engine.dispose()


def markdown(r: dict[str, Any]) -> str:
    m = r["meta"]
    lines = ["# Plan time right after a run (no VACUUM)", "",
             f"Command: `{m['command']}`; {m['started']}, load after {m['load_after']} on "
             f"{m['cpus']} CPUs; {m['rows']:,} rows in the default mix, batch {m['batch']:,}. "
             "`first`: the first plan after the run; `rest`: the median of the plans after "
             "it. Target: plan <= 20 ms.", "",
             "| database | plan of | first ms | rest ms (median) | max ms | reason |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    worst = 0.0
    for d in r["results"]:
        for label, key in (("empty run after the big run "
                            f"({d['big_run']['rows']:,} rows, {d['big_run']['planner']})",
                            "plan_after_big"),
                           ("steady run (1% expired)", "steady_plan"),
                           (f"empty run after the steady run ({d['steady_run']['rows']:,} "
                            "rows)", "plan_after_steady")):
            p = d[key]
            worst = max(worst, p["max_ms"])
            lines.append(f"| {d['database']} | {label} | {p['first_ms']} | "
                         f"{p['median_rest_ms']} | {p['max_ms']} | {p['reason'][:160]} |")
    lines += ["", f"Target plan <= {TARGET_MS:g} ms: "
              + ("holds" if worst <= TARGET_MS else f"MISSED (worst {worst} ms)") + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: list[dict[str, Any]] = []
    for dialect in args.databases.split(","):
        if dialect == "postgresql":
            url = data.recreate(args.pg_url, DATABASE)
        else:
            url = crossover_mariadb._fresh(args.mariadb_url, DATABASE)
        try:
            out.append(measure(dialect, url, args))
        finally:
            drop(dialect, args.pg_url if dialect == "postgresql" else args.mariadb_url)
    results = {"meta": {"started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                        "load_after": load(), "cpus": os.cpu_count(), "rows": args.rows,
                        "batch": args.batch, "command": "python -m bench.plan_after_run "
                        + " ".join(sys.argv[1:] if argv is None else argv)},
               "results": out}
    (args.out / "plan_after_run.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "plan_after_run.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
