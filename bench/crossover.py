"""``python -m bench.crossover``: where the expiry-index planner stops beating physical ranges.

    python -m bench.crossover --rows 1000000 --mariadb-rows 300000
    python -m bench.crossover --rows 100000 --quick --fractions 1,50 --mariadb-rows 0

PostgreSQL: per expired fraction (bench.names.EXPIRED_MIXES: expired rows interleaved in id
order), one template; statesweep_blocks_2w, statesweep_expiry_2w (and statesweep_walk_2w at
0.1% and 1%) each measured by bench.measure on a fresh clone of it, with a writer beside, end
state verified. MariaDB (bench.crossover_mariadb): ids against expiry in-process. The
crossover is the expired fraction at which expiry's wall (or CPU) first reaches the physical
planner's, interpolated on a log scale between the two fractions measured either side of it;
``auto``'s BACKLOG_FRACTION (workers/planners/__init__.py) is meant to be set from it.
Outputs: bench/results/crossover.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import statistics
import sys
import uuid
from typing import Any

from bench import crossover_mariadb, data, names
from bench.measure import add_service_args, load, measure, progress
from workers.db import db_now, make_engine
from workers.schema import build_tables
from workers.seed import SeedSpec

FRACTIONS = (0.1, 1, 5, 10, 25, 50)
WALK_AT = (0.1, 1)
#: (fast planner, physical planner) per database
PAIRS = {"postgresql": ("expiry", "blocks"), "mariadb": ("expiry", "ids")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.crossover", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="PostgreSQL task_state rows")
    p.add_argument("--mariadb-rows", type=int, default=300_000, help="0: skip MariaDB")
    p.add_argument("--mariadb-url", default=os.environ.get(
        "STATESWEEP_BENCH_MARIADB_URL", "mysql://root@127.0.0.1:3306/test"))
    p.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS),
                   help="expired percents, from bench.names.EXPIRED_MIXES")
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--writer-rate", type=float, default=200.0)
    p.add_argument("--quick", action="store_true", help="shorter idle windows")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per planner and fraction; tables show the median")
    add_service_args(p, "statesweep_crossover")
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)
    args.fraction_list = [float(f) for f in args.fractions.split(",") if f]
    unknown = [f for f in args.fraction_list if f not in names.EXPIRED_MIXES]
    if unknown:
        p.error(f"--fractions: no mix for {unknown}; known: {sorted(names.EXPIRED_MIXES)}")
    args.chunk_rate_limit, args.py_spy = "", False
    return args


def postgres(args: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    tables = build_tables("seed")
    tmp = args.out / "tmp" / uuid.uuid4().hex[:8]
    tmp.mkdir(parents=True, exist_ok=True)
    with data.scratch_databases(args.pg_url, args.database) as template:
        engine = make_engine(template)
        with engine.connect() as conn:
            now = db_now(conn)
        engine.dispose()
        data.build(data.database_url(args.pg_url, f"{args.database}_warm"), tables,
                   SeedSpec(rows=data.WARM_ROWS), now)
        for pct in args.fraction_list:
            data.recreate(args.pg_url, f"{args.database}_template")
            engine = make_engine(template)
            with engine.connect() as conn:
                now = db_now(conn)
            engine.dispose()
            dataset = data.build(template, tables, names.seed_spec(args.rows, pct), now)
            keys = data.writer_keys(template)
            progress(f"postgresql {pct:g}%: {dataset.expired:,} expired of {dataset.rows:,}, "
                     f"built in {dataset.build_seconds:.0f} s")
            planners = ["blocks", "expiry"] + (["walk"] if pct in WALK_AT else [])
            # Repeats alternate the order, so neither planner always runs first.
            order = [p for rep in range(args.repeat) for p in (planners[::-1] if rep % 2
                                                               else planners)]
            for planner in order:
                method = names.parse_methods([f"statesweep_{planner}_2w"], [])[0]
                row, _ = measure(args, method, keys, tmp, dataset)
                d = row["detail"]
                out.append({
                    "database": "postgresql", "expired_percent": pct, "planner": planner,
                    "wall_s": row["seconds"], "db_cpu_s": row["postgres_cpu_seconds"],
                    "sweep_backends_cpu_s": round(sum(
                        v for k, v in row["cpu_seconds"].items()
                        if k.startswith("postgres backends of statesweep")), 2),
                    "rows": row["rows"], "chunks": d.get("chunks"),
                    "plan_ms": d.get("planning_ms"), "planner_reason": d.get("planner_reason"),
                    "verified": row["verified"], "writer_p99_ms": row["writer"]["p99_ms"]})
    return out


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (database, fraction, planner): the median run of each measure, with n."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["database"], r["expired_percent"], r["planner"]), []).append(r)
    out = []
    for runs in groups.values():
        row = dict(runs[0])
        for key in ("wall_s", "db_cpu_s"):
            row[key] = round(statistics.median(r[key] for r in runs), 3)
        row["n"] = len(runs)
        row["verified"] = all(r.get("verified", True) for r in runs)
        out.append(row)
    return out


def crossover(rows: list[dict[str, Any]], database: str, key: str) -> dict[str, Any]:
    """Where *fast*'s ``key`` over *physical*'s first reaches 1 as the fraction grows."""
    fast, physical = PAIRS[database]
    by = {(r["expired_percent"], r["planner"]): r for r in rows if r["database"] == database}
    points = sorted((pct, by[(pct, fast)][key] / by[(pct, physical)][key])
                    for pct, p in by if p == fast and (pct, physical) in by
                    and by[(pct, physical)][key])
    prev = None
    for pct, ratio in points:
        if ratio >= 1:
            if prev is None:
                return {"percent": pct, "how": f"{fast} already slower at the smallest fraction",
                        "ratios": points}
            (p0, r0) = prev
            # Linear in log(fraction) between the two measured points.
            x = math.log(p0) + (1 - r0) / (ratio - r0) * (math.log(pct) - math.log(p0))
            return {"percent": round(math.exp(x), 2), "how": f"between {p0:g}% and {pct:g}%",
                    "ratios": points}
        prev = (pct, ratio)
    return {"percent": None, "how": f"{fast} faster at every fraction measured", "ratios": points}


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = ["# Planner crossover: expiry index against physical ranges", "",
             f"Command: `{meta['command']}`  ",
             f"When: {meta['started']}; load before {meta['load_before']}, after "
             f"{meta['load_after']} on {meta['cpus']} CPUs. PostgreSQL: {meta['rows']:,} rows, "
             f"2 chunk workers each (bench.measure: fresh clone, writer beside, end state "
             f"verified); CPU = every PostgreSQL process over the run. MariaDB: "
             f"{meta['mariadb_rows']:,} rows, in-process run_local; CPU = the server process. "
             f"Batch {meta['batch']}. Expired rows interleaved in id order.", "",
             "| database | expired % | planner | runs | wall s (median) | DB CPU s (median) | rows "
             "| chunks | plan ms | × physical wall | × physical CPU |",
             "| --- | ---: | --- |" + " ---: |" * 8]
    table = medians(results["rows"])
    by = {(r["database"], r["expired_percent"], r["planner"]): r for r in table}
    for r in table:
        base = by.get((r["database"], r["expired_percent"], PAIRS[r["database"]][1]))
        wall = f"{r['wall_s'] / base['wall_s']:.2f}" if base and base["wall_s"] else "-"
        cpu = f"{r['db_cpu_s'] / base['db_cpu_s']:.2f}" if base and base["db_cpu_s"] else "-"
        plan = "-" if r.get("plan_ms") is None else f"{r['plan_ms']:.1f}"
        lines.append(f"| {r['database']} | {r['expired_percent']:g} | {r['planner']} | "
                     f"{r['n']} | {r['wall_s']:.2f} | {r['db_cpu_s']:.2f} | {r['rows']:,} | "
                     f"{r.get('chunks') or '-'} | {plan} | {wall} | {cpu} |")
    lines += ["", "## Crossover (expiry stops being faster)", ""]
    for name, c in results["crossover"].items():
        where = "none" if c["percent"] is None else f"{c['percent']:g}% expired"
        lines.append(f"- {name}: {where} ({c['how']})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_before = dt.datetime.now(dt.UTC), load()
    rows = postgres(args) if args.rows else []
    if args.mariadb_rows:
        rows += crossover_mariadb.measure(args.mariadb_url, args.mariadb_rows,
                                          args.fraction_list, args.batch, args.repeat)
    results: dict[str, Any] = {
        "meta": {"rows": args.rows, "mariadb_rows": args.mariadb_rows, "batch": args.batch,
                 "started": started.isoformat(timespec="seconds"), "load_before": load_before,
                 "load_after": load(), "cpus": os.cpu_count(),
                 "command": "python -m bench.crossover " + " ".join(
                     shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))},
        "repeat": args.repeat, "rows": rows}
    results["crossover"] = {
        f"{db} {what}": crossover(medians(rows), db, key)
        for db in PAIRS if any(r["database"] == db for r in rows)
        for what, key in (("wall", "wall_s"), ("CPU", "db_cpu_s"))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "crossover.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "crossover.md").write_text(markdown(results))
    print(markdown(results))
    return 0 if all(r.get("verified", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
