"""``python -m bench.dbclean_compare``: ``statesweep db-clean`` against ``airflow db clean``.

    python -m bench.dbclean_compare --airflow /opt/af-3.3.2/bin/airflow [--scale 1]

One PostgreSQL database holding Airflow 3.3.2's schema (tests/airflow_schemas, made by
``airflow db migrate``; ``--migrate`` runs the migration here instead) is filled with Airflow
rows spread around T = 2026-06-01: dags, dag versions (some still referenced by task
instances), dag runs (scheduled and manual, some never started), task instances, XComs, task
reschedules, task state, log, job, callbacks in every state with deadlines, import errors,
revoked tokens. It is cloned twice per case; ``airflow db clean --clean-before-timestamp T -y``
runs on one clone (Airflow's own environment, ``--airflow``), ``statesweep db-clean --local -y``
with the same options on the other, and every table of the schema is compared by primary key.
On statesweep's clone each archive must hold exactly the rows its table lost; Airflow's archives
(one per batch) are compared with statesweep's (one per table) too. Output:
bench/results/dbclean_compare.md and .json. Timings are one process each, for orientation only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, Table, create_engine, inspect, select, text

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
T = "2026-06-01T00:00:00+00:00"
PREFIX = "_airflow_deleted__"

# One statement per table, over generate_series: the sizes are :d dags, :r dag runs, :k task
# instances per run, :l log rows. Times spread from 90 days before T to 30 days after it, in a
# scattered order (i * prime % 120), so each table is cut in many places.
FILL = [
    "INSERT INTO dag_bundle (name) VALUES ('b')",
    # A third of the dags parsed recently: only their versions are referenced by task instances
    # (a version still referenced cannot be deleted, and a dag's delete cascades to versions).
    """INSERT INTO dag (dag_id, is_paused, is_stale, bundle_name, timetable_type,
        partition_mapper_info, max_active_tasks, max_consecutive_failed_dag_runs,
        has_task_concurrency_limits, last_parsed_time)
       SELECT 'dag_' || i, false, false, 'b', 'cron', '{}', 16, 0, false,
              TIMESTAMPTZ :t + ((i % 3) - 2) * INTERVAL '30 days'
       FROM generate_series(1::bigint, :d) i""",
    """INSERT INTO dag_version (id, version_number, dag_id, created_at, last_updated)
       SELECT md5(i || 'v')::uuid, (i - 1) / :d + 1, 'dag_' || ((i - 1) % :d + 1),
              TIMESTAMPTZ :t + (((i - 1) / :d) - 2) * INTERVAL '20 days' + i * INTERVAL '1 s',
              TIMESTAMPTZ :t
       FROM generate_series(1::bigint, 3 * :d) i""",
    """INSERT INTO dag_run (id, dag_id, run_id, run_type, run_after, start_date, state)
       SELECT i, 'dag_' || ((i - 1) % :d + 1), 'run_' || i,
              CASE WHEN i % 10 = 0 THEN 'manual' ELSE 'scheduled' END,
              TIMESTAMPTZ :t + ((i * 7919 % 120) - 90) * INTERVAL '1 day' + i * INTERVAL '1 s',
              CASE WHEN i % 50 = 0 THEN NULL ELSE TIMESTAMPTZ :t
                   + ((i * 7919 % 120) - 90) * INTERVAL '1 day' + i * INTERVAL '1 s' END,
              'success'
       FROM generate_series(1::bigint, :r) i""",
    """INSERT INTO task_instance (id, task_id, dag_id, run_id, try_number, pool, pool_slots,
        start_date, state, dag_version_id)
       SELECT md5(i || 'ti')::uuid, 't' || ((i - 1) % :k),
              'dag_' || (((i - 1) / :k) % :d + 1), 'run_' || ((i - 1) / :k + 1), 1,
              'default_pool', 1,
              CASE WHEN i % 13 = 0 THEN NULL
                   ELSE TIMESTAMPTZ :t + ((i * 104729 % 120) - 90) * INTERVAL '1 day' END,
              'success',
              CASE WHEN (((i - 1) / :k) % :d + 1) % 3 = 2 AND i % 5 = 0
                   THEN md5((((i - 1) / :k) % :d + 1) || 'v')::uuid END
       FROM generate_series(1::bigint, :r * :k) i""",
    """INSERT INTO xcom (dag_run_id, task_id, map_index, key, dag_id, run_id, timestamp, value)
       SELECT (i - 1) / :k + 1, 't' || ((i - 1) % :k), -1, 'return_value',
              'dag_' || (((i - 1) / :k) % :d + 1), 'run_' || ((i - 1) / :k + 1),
              TIMESTAMPTZ :t + ((i * 31337 % 120) - 90) * INTERVAL '1 day', '1'
       FROM generate_series(1::bigint, :r * :k) i""",
    """INSERT INTO task_reschedule (ti_id, start_date, end_date, duration, reschedule_date)
       SELECT md5(i || 'ti')::uuid, ts, ts, 1, ts FROM (
         SELECT i, TIMESTAMPTZ :t + ((i * 613 % 120) - 90) * INTERVAL '1 day' AS ts
         FROM generate_series(7::bigint, :r * :k, 7) i) s""",
    """INSERT INTO task_state_store (dag_run_id, task_id, map_index, key, dag_id, run_id, value,
        updated_at, expires_at)
       SELECT (i - 1) / 2 + 1, 't0', -1, 'k' || (i % 2), 'dag_' || (((i - 1) / 2) % :d + 1),
              'run_' || ((i - 1) / 2 + 1), 'v', TIMESTAMPTZ :t,
              CASE WHEN i % 10 = 0 THEN NULL
                   ELSE TIMESTAMPTZ :t + ((i * 17 % 120) - 90) * INTERVAL '1 day' END
       FROM generate_series(1::bigint, 2 * :r) i""",
    """INSERT INTO log (dttm, dag_id, event)
       SELECT TIMESTAMPTZ :t + ((i * 31 % 120) - 90) * INTERVAL '1 day' + i * INTERVAL '1 s',
              'dag_' || (i % :d + 1), 'e'
       FROM generate_series(1::bigint, :l) i""",
    """INSERT INTO job (dag_id, latest_heartbeat, state, job_type)
       SELECT CASE WHEN i % 4 = 0 THEN NULL ELSE 'dag_' || (i % :d + 1) END,
              TIMESTAMPTZ :t + ((i * 37 % 120) - 90) * INTERVAL '1 day', 'success', 'Job'
       FROM generate_series(1::bigint, :r) i""",
    # Callbacks in every state Airflow knows and NULL; half the scheduled ones have a deadline.
    """INSERT INTO callback (id, type, fetch_method, data, priority_weight, state, created_at)
       SELECT md5(i || 'cb')::uuid, 'triggerer', 'import_path', '{}', 1,
              (ARRAY['success', 'failed', 'running', 'scheduled', NULL, 'pending',
                     'queued'])[i % 7 + 1],
              TIMESTAMPTZ :t + ((i * 41 % 120) - 90) * INTERVAL '1 day'
       FROM generate_series(1::bigint, :r / 3) i""",
    """INSERT INTO deadline (id, created_at, last_updated_at, dagrun_id, deadline_time, missed,
        callback_id)
       SELECT md5(i || 'dl')::uuid, TIMESTAMPTZ :t, TIMESTAMPTZ :t, i % :r + 1,
              TIMESTAMPTZ :t + ((i * 43 % 120) - 90) * INTERVAL '1 day', false,
              md5(i || 'cb')::uuid
       FROM generate_series(1::bigint, :r / 3) i WHERE i % 7 = 3 AND i % 2 = 0""",
    """INSERT INTO import_error (timestamp, filename)
       SELECT TIMESTAMPTZ :t + ((i * 47 % 120) - 90) * INTERVAL '1 day', 'f' || i
       FROM generate_series(1::bigint, :r / 20) i""",
    """INSERT INTO revoked_token (jti, exp)
       SELECT md5(i || 'jti'), TIMESTAMPTZ :t + ((i * 53 % 120) - 90) * INTERVAL '1 day'
       FROM generate_series(1::bigint, :r / 4) i""",
]


def sql_with(statement: str, sizes: dict[str, int]) -> str:
    for name, value in sizes.items():
        statement = statement.replace(f":{name}", str(int(value)))
    return statement.replace("TIMESTAMPTZ :t", f"TIMESTAMPTZ '{T}'")


def admin() -> Engine:
    return create_engine(ADMIN, isolation_level="AUTOCOMMIT")


def url_of(name: str) -> str:
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


@contextmanager
def database(name: str, template: str | None = None) -> Iterator[str]:
    eng = admin()
    with eng.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template or "template0"}"'))
    try:
        yield url_of(name)
    finally:
        with eng.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        eng.dispose()


def airflow_order(airflow: str) -> tuple[str, list[str]]:
    """A PYTHONHASHSEED under which Airflow cleans dag_run before callback and
    partitioned_asset_key_log, as statesweep always does, and Airflow's table order under it.

    Airflow orders the tables it cleans by iterating a Python set of their names, so the order
    (and, where one table's cascade changes what another's filter reads, the result) changes
    with each process's hash seed: a callback whose only deadline goes with its dag run is
    purged only if dag_run is cleaned first."""
    python = str(Path(airflow).parent / "python")
    probe = ("from airflow.utils.db_cleanup import _effective_table_names as e; "
             "print(','.join(e(table_names=None)[0]))")
    for seed in range(100):
        with tempfile.TemporaryDirectory() as home:
            done = subprocess.run([python, "-c", probe], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONHASHSEED": str(seed),
                                       "AIRFLOW_HOME": home}, check=True)
        order = done.stdout.strip().splitlines()[-1].split(",")
        if order.index("dag_run") < min(order.index("callback"),
                                        order.index("partitioned_asset_key_log")):
            return str(seed), order
    raise SystemExit("no hash seed puts Airflow's dag_run before callback")


SEED = "0"


def airflow_env(url: str, home: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("STATESWEEP_")},
            "PYTHONHASHSEED": SEED,
            "AIRFLOW_HOME": home, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url.replace("postgresql://",
                                                               "postgresql+psycopg2://")}


def build_source(url: str, airflow: str, migrate: bool, sizes: dict[str, int]) -> None:
    if migrate:
        with tempfile.TemporaryDirectory() as home:
            subprocess.run([airflow, "db", "migrate"], env=airflow_env(url, home), check=True,
                           capture_output=True)
    else:
        from tests.airflow_schemas import load

        load(url, "3.3.2")
    eng = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with eng.begin() as conn:
        for statement in FILL:
            conn.execute(text(sql_with(statement, sizes)))
    with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    eng.dispose()


def snapshot(url: str) -> dict[str, set[Any]]:
    """Primary keys of every table (archives included), as sets of tuples of text."""
    eng = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    out: dict[str, set[Any]] = {}
    try:
        with eng.connect() as conn:
            for name in inspect(conn).get_table_names():
                t = Table(name, MetaData(), autoload_with=conn)
                cols = list(t.primary_key.columns) or list(t.c)
                if name.startswith(PREFIX):  # archives have no key: the source's key columns
                    cols = [t.c[c] for c in _source_key(conn, name) if c in t.c] or list(t.c)
                out[name] = {tuple(str(v) for v in row) for row in conn.execute(select(*cols))}
    finally:
        eng.dispose()
    return out


def _source_key(conn: Any, archive: str) -> list[str]:
    # _airflow_deleted__<table>__<time>[__b<n>]: table names hold no double underscore.
    source = archive[len(PREFIX):].split("__")[0]
    return list(inspect(conn).get_pk_constraint(source)["constrained_columns"])


def archived(snap: dict[str, set[Any]]) -> dict[str, list[Any]]:
    """Archive rows per source table, every batch's archive together (a list: duplicates show)."""
    out: dict[str, list[Any]] = {}
    for name, rows in snap.items():
        if name.startswith(PREFIX):
            rest = name[len(PREFIX):]
            source = rest.split("__")[0]
            out.setdefault(source, []).extend(rows)
    return out


def run_case(src: str, airflow: str, skip_archive: bool, batch: int) -> dict[str, Any]:
    extra = ["--skip-archive"] if skip_archive else []
    with database("dbclean_cmp_airflow", src) as af_url, \
            database("dbclean_cmp_statesweep", src) as ss_url:
        with tempfile.TemporaryDirectory() as home:
            t0 = time.monotonic()
            done = subprocess.run([airflow, "db", "clean", "--clean-before-timestamp", T, "-y",
                                   "--batch-size", str(batch), *extra],
                                  env=airflow_env(af_url, home), capture_output=True, text=True)
            af_seconds = time.monotonic() - t0
        if done.returncode != 0:
            raise SystemExit(f"airflow db clean failed:\n{done.stderr[-3000:]}")
        env = {**os.environ, "STATESWEEP_DATABASE_URL": ss_url,
               "STATESWEEP_RUN_STORE_URL": "memory://"}
        t0 = time.monotonic()
        ours = subprocess.run([sys.executable, "-c", "from workers.cli import main; main()",
                               "db-clean", "--clean-before-timestamp", T, "-y", "--local",
                               "--batch-size", str(batch), "--format", "json", *extra],
                              env=env, capture_output=True, text=True, cwd=ROOT)
        ss_seconds = time.monotonic() - t0
        if ours.returncode != 0:
            raise SystemExit(f"statesweep db-clean failed:\n{ours.stderr[-3000:]}")
        af, ss = snapshot(af_url), snapshot(ss_url)
    return {"airflow": af, "statesweep": ss, "airflow_seconds": af_seconds,
            "statesweep_seconds": ss_seconds, "report": json.loads(ours.stdout)}


def compare(before: dict[str, set[Any]], case: dict[str, Any]) -> dict[str, Any]:
    af, ss = case["airflow"], case["statesweep"]
    tables = sorted(n for n in before if not n.startswith(PREFIX))
    rows = []
    for name in tables:
        # Airflow's CLI writes its own audit row into log: rows that were not in the source
        # are Airflow's, not left by its cleanup.
        added = af[name] - before[name]
        same = af[name] - added == ss[name]
        rows.append({"table": name, "before": len(before[name]),
                     "airflow": len(af[name] - added), "airflow_added": len(added),
                     "statesweep": len(ss[name]), "identical": same})
    ss_arch, af_arch = archived(ss), archived(af)
    archives = []
    for source in sorted(set(ss_arch) | set(af_arch)):
        lost = before[source] - ss[source]
        mine = ss_arch.get(source, [])
        archives.append({
            "table": source, "statesweep_archived": len(mine),
            "statesweep_deleted": len(lost),
            "statesweep_archived_once_and_deleted": (len(mine) == len(set(mine))
                                                     and set(mine) <= lost),
            "airflow_archived": len(af_arch.get(source, [])),
            "same_rows_as_airflows_archives": set(mine) == set(af_arch.get(source, [])),
            "statesweep_archive_tables": sum(1 for n in ss if n.startswith(
                f"{PREFIX}{source}__")),
            "airflow_archive_tables": sum(1 for n in af if n.startswith(f"{PREFIX}{source}__")),
        })
    return {"tables": rows, "archives": archives,
            "identical": all(r["identical"] for r in rows),
            "airflow_seconds": round(case["airflow_seconds"], 2),
            "statesweep_seconds": round(case["statesweep_seconds"], 2)}


def render(sizes: dict[str, int], results: dict[str, dict[str, Any]], airflow: str) -> str:
    lines = ["# statesweep db-clean vs airflow db clean (Airflow 3.3.2, PostgreSQL)", "",
             f"Generated by `python -m bench.dbclean_compare` ({airflow}); sizes: "
             + ", ".join(f"{k}={v}" for k, v in sizes.items())
             + f"; --clean-before-timestamp {T}.", ""]
    for case, res in results.items():
        lines += [f"## {case}", "",
                  f"Every table identical by primary key: **{res['identical']}**. "
                  f"airflow db clean {res['airflow_seconds']} s, statesweep db-clean --local "
                  f"{res['statesweep_seconds']} s (one process each).", "",
                  "| table | rows before | left by airflow | left by statesweep | identical |",
                  "| --- | ---: | ---: | ---: | --- |"]
        for r in res["tables"]:
            if r["before"] or r["airflow"] or r["statesweep"]:
                added = f" (+{r['airflow_added']} its own)" if r["airflow_added"] else ""
                lines.append(f"| {r['table']} | {r['before']} | {r['airflow']}{added} | "
                             f"{r['statesweep']} | {'yes' if r['identical'] else '**NO**'} |")
        if res["archives"]:
            lines += ["", "Rows a table's own rule deletes are archived, each once; rows "
                      "a parent's cascade deletes are not, in either tool.", "",
                      "| archived table | statesweep rows (tables) | deleted in all | "
                      "archived once and deleted | airflow rows (tables) | same rows as "
                      "airflow's |",
                      "| --- | ---: | ---: | --- | ---: | --- |"]
            for a in res["archives"]:
                lines.append(
                    f"| {a['table']} | {a['statesweep_archived']} "
                    f"({a['statesweep_archive_tables']}) | {a['statesweep_deleted']} | "
                    f"{'yes' if a['statesweep_archived_once_and_deleted'] else '**NO**'} | "
                    f"{a['airflow_archived']} ({a['airflow_archive_tables']}) | "
                    f"{'yes' if a['same_rows_as_airflows_archives'] else '**NO**'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--airflow", default="/opt/af-3.3.2/bin/airflow")
    p.add_argument("--scale", type=float, default=1.0, help="x 20 000 dag runs, 5 tasks each")
    p.add_argument("--batch-size", type=int, default=10000)
    p.add_argument("--migrate", action="store_true", help="airflow db migrate, not the dump")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dbclean_compare"))
    args = p.parse_args(argv)
    sizes = {"d": 50, "r": int(20000 * args.scale), "k": 5, "l": int(200000 * args.scale)}
    global SEED
    SEED, order = airflow_order(args.airflow)
    results: dict[str, dict[str, Any]] = {}
    with database("dbclean_cmp_source") as src:
        build_source(src, args.airflow, args.migrate, sizes)
        before = snapshot(src)
        for case, skip in (("archived", False), ("--skip-archive", True)):
            print(f"case {case} …", file=sys.stderr)
            results[case] = compare(before, run_case("dbclean_cmp_source", args.airflow, skip,
                                                     args.batch_size))
            print(f"  identical: {results[case]['identical']}", file=sys.stderr)
    page = render(sizes, results, args.airflow) + (
        f"\nAirflow ran with PYTHONHASHSEED={SEED}; its table order: {', '.join(order)}. "
        "Airflow orders tables by Python's set order, which changes with the hash seed; under "
        "a seed that cleans callback before dag_run it purges fewer callbacks (those whose only "
        "deadline goes with its dag run). statesweep always cleans dag_run first.\n")
    Path(args.out + ".md").write_text(page)
    Path(args.out + ".json").write_text(json.dumps(
        {"sizes": sizes, "airflow_hash_seed": SEED, "airflow_order": order,
         "results": results}, indent=2, default=str))
    print(page)
    if not all(r["identical"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
