"""``python -m bench.selection_cost``: what a run narrowed to one dag id costs, next to a whole run.

    python -m bench.selection_cost --rows 1000000 --dags 100 --expired 1,50

Issue 23: a run restricted to one dag id of 100 must not cost a whole-table run. For each
expired share, one standalone-schema table on PostgreSQL (``--rows`` rows spread evenly over
``--dags`` dag ids, the expired ones spread over ids and dag ids alike), cloned per run; on each
clone one ``statesweep cleanup --local`` in a process of its own: with ``--dag-ids dag_7``, and
without. Per run: wall, the planner ``auto`` chose, rows deleted, and what PostgreSQL touched in
the table (heap blocks read or hit, tuples fetched by index or read by scan; from
pg_statio_user_tables / pg_stat_user_tables, the clone being fresh). `run s` is the run
record's duration (plan to last commit), `process wall` the command's, start-up included.
Output:
bench/results/selection_cost.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

from bench.data import autocommit, clone, scratch_databases
from bench.measure import load

RESULTS = Path(__file__).parent / "results"
ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def seed(url: str, rows: int, dags: int, expired_pct: float) -> None:
    env = {**os.environ, "STATESWEEP_DATABASE_URL": url}
    subprocess.run([str(Path(sys.executable).with_name("statesweep")), "db", "upgrade"],
                   env=env, check=True, capture_output=True)
    runs_per_dag = 10
    engine = autocommit(url)
    with engine.connect() as conn:
        conn.execute(text(
            "INSERT INTO dag_run (dag_id, run_id) SELECT 'dag_' || d, 'run_' || r "
            "FROM generate_series(0, :dags - 1) d, generate_series(0, :runs - 1) r"),
            {"dags": dags, "runs": runs_per_dag})
        # Row i belongs to dag i % dags; expired rows are every (100/pct)-th, so each dag id
        # holds the same share of them.
        conn.execute(text(
            "INSERT INTO task_state (dag_run_id, task_id, map_index, key, dag_id, run_id, value,"
            " updated_at, expires_at) "
            "SELECT dr.id, 't' || (i % 7), -1, 'k' || i, dr.dag_id, dr.run_id, 'v', now(), "
            "  CASE WHEN (i::bigint * 7919) % 10000 < :exp_permyriad "
            "       THEN now() - interval '1 hour' - (i % 1000) * interval '1 second' "
            "       ELSE now() + interval '30 days' END "
            "FROM generate_series(0, :rows - 1) i "
            "JOIN dag_run dr ON dr.dag_id = 'dag_' || (i % :dags) "
            " AND dr.run_id = 'run_' || ((i / :dags) % :runs)"),
            {"rows": rows, "dags": dags, "runs": runs_per_dag,
             "exp_permyriad": int(expired_pct * 100)})
        conn.execute(text("VACUUM ANALYZE task_state"))
        conn.execute(text("VACUUM ANALYZE dag_run"))
    engine.dispose()


STATS = ("SELECT s.seq_tup_read, s.idx_tup_fetch, s.n_tup_del, "
         "io.heap_blks_read + io.heap_blks_hit AS heap_blocks, "
         "io.idx_blks_read + io.idx_blks_hit AS index_blocks "
         "FROM pg_stat_user_tables s JOIN pg_statio_user_tables io USING (relid) "
         "WHERE s.relname = 'task_state'")


def stats(url: str) -> dict[str, int]:
    engine = autocommit(url)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        row = conn.execute(text(STATS)).mappings().one()
    engine.dispose()
    return {k: int(v or 0) for k, v in row.items()}


def run(url: str, args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "STATESWEEP_DATABASE_URL": url, "STATESWEEP_RUN_STORE_URL": "memory://",
           "AIRFLOW_CONFIG": os.devnull}
    cmd = [str(Path(sys.executable).with_name("statesweep")), "cleanup", "--local",
           "--format", "json", *args]
    before = stats(url)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"statesweep cleanup failed ({proc.returncode}): {proc.stderr[-2000:]}")
    time.sleep(0.7)  # the statistics collector's flush (PGSTAT_MIN_INTERVAL is 1 s at most)
    after = stats(url)
    record = json.loads(proc.stdout)
    return {"wall": wall, "run": float(record["duration"]), "planner": record["planner"],
            "rows": int(record["rows_deleted"]), **{k: after[k] - before[k] for k in after}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dags", type=int, default=100)
    p.add_argument("--expired", default="1,50", help="expired shares in percent")
    args = p.parse_args(argv)
    lines = [f"# A run narrowed to one dag id of {args.dags}, next to a whole run", "",
             f"Command: `python -m bench.selection_cost --rows {args.rows} --dags {args.dags} "
             f"--expired {args.expired}`; load before {load()}. One `statesweep cleanup --local` "
             "per fresh clone; the counters are PostgreSQL's for task_state over the run.", "",
             "| expired | run | planner | rows deleted | run s | process wall s | heap blocks | "
             "index blocks | "
             "tuples fetched by index | tuples read by scan |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for pct in (float(x) for x in args.expired.split(",")):
        with scratch_databases(ADMIN, "selcost") as template:
            seed(template, args.rows, args.dags, pct)
            for name, extra in (("--dag-ids dag_7", ["--dag-ids", "dag_7"]), ("whole", [])):
                url, _ = clone(ADMIN, "selcost")
                r = run(url, extra)
                lines.append(f"| {pct:g}% | {name} | {r['planner']} | {r['rows']:,} | "
                             f"{r['run']:.3f} | {r['wall']:.2f} | {r['heap_blocks']:,} | "
                             f"{r['index_blocks']:,} | "
                             f"{r['idx_tup_fetch']:,} | {r['seq_tup_read']:,} |")
                print(lines[-1], flush=True)
    lines += ["", f"Load after: {load()}."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "selection_cost.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
