"""What the exporter's backlog queries cost on a big task_state: EXPLAIN (ANALYZE, BUFFERS)
of each, on a scratch PostgreSQL database built with bench.data (dropped afterwards).

    .venv/bin/python -m bench.backlog_queries --rows 5000000

Each query runs twice and the second (warm) run is reported, as a scrape every 15 s would
find the index in shared buffers. The count is also run after 10% of the rows were rewritten
and not yet vacuumed (the visibility map no longer covers their pages, so an index-only scan
must visit the heap), and against the planner's estimate, the zero-cost alternative.
"""

from __future__ import annotations

import argparse
import json
import os

from sqlalchemy import text

from bench.data import autocommit, build, scratch_databases
from workers.db import make_engine
from workers.schema import build_tables

QUERIES = {
    "expired rows (count)": "SELECT count(*) FROM task_state WHERE expires_at < now()",
    "oldest expired (min)": "SELECT min(expires_at) FROM task_state WHERE expires_at < now()",
    "orphaned asset state": (
        "SELECT count(*) FROM asset_state WHERE asset_id IN (SELECT asset.id FROM asset WHERE "
        "NOT EXISTS (SELECT 1 FROM asset_active WHERE asset_active.name = asset.name AND "
        "asset_active.uri = asset.uri))"),
}


def explain(url: str, sql: str) -> dict[str, object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            for _ in range(2):
                plan = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}")
                                    ).scalar_one()[0]
    finally:
        engine.dispose()
    node = plan["Plan"]
    while node.get("Plans") and node["Node Type"] in ("Aggregate", "Result", "Limit", "Gather"):
        node = node["Plans"][0]
    return {"ms": round(plan["Execution Time"], 1), "node": node["Node Type"],
            "index": node.get("Index Name", ""), "heap_fetches": node.get("Heap Fetches"),
            "shared_hit": plan["Plan"].get("Shared Hit Blocks"),
            "shared_read": plan["Plan"].get("Shared Read Blocks")}


def estimate(url: str) -> tuple[int, int]:
    """(the exporter's estimate, exact count) of expired rows."""
    from workers.exporter import read_backlog

    engine = make_engine(url)
    try:
        return (read_backlog(engine, "seed", 5000, "estimate").expired_rows,
                read_backlog(engine, "seed", 5000, "exact").expired_rows)
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--pg-url", default=os.environ.get(
        "STATESWEEP_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()
    import datetime as dt

    tables = build_tables("seed")
    with scratch_databases(args.pg_url, "statesweep_bench_backlog") as url:
        data = build(url, tables, args.rows, dt.datetime.now(dt.UTC))
        report: dict[str, object] = {"rows": args.rows, "expired": data.expired,
                                     "build_seconds": round(data.build_seconds, 1)}
        report["vacuumed"] = {name: explain(url, sql) for name, sql in QUERIES.items()}
        report["estimate_vs_exact"] = estimate(url)
        with autocommit(url).connect() as conn:
            conn.execute(text("UPDATE task_state SET value = value WHERE id % 10 = 0"))
        report["10% rewritten, not vacuumed"] = {
            "expired rows (count)": explain(url, QUERIES["expired rows (count)"])}
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
