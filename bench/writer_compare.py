"""``python -m bench.writer_compare``: statesweep's writer library against Airflow's own backend.

    python -m bench.writer_compare --airflow /opt/af-3.4/bin/airflow
    python -m bench.writer_compare --airflow /opt/af-3.3.2/bin/airflow

statesweep's :class:`workers.store.MetastoreStateBackend` writes state rows that Airflow's own
``airflow.state.metastore.MetastoreBackend`` must read, and the other way round. For each
dialect, two databases of the schema that Airflow version migrates to (tests/airflow_schemas),
each with the same dag run and asset: statesweep writes a set of (scope, key, value) on one,
Airflow writes the same set on the other, in Airflow's own environment (the interpreter beside
``--airflow``; statesweep never imports Airflow). Then each side reads both databases, and the
rows themselves are compared column by column (all but the surrogate id and the timestamps).
The set covers an unmapped task (index -1), a mapped index, on 3.4 a region (``region_id``, a
uuid on PostgreSQL and 16 bytes on MySQL) beside the legacy all-zero region, non-ASCII and long
values, an overwrite and a delete, and asset state. Output:
bench/results/writer_compare_<schema version>.md; exit 1 on any difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, Table, select

from bench.selection_compare import parse_airflow_args
from tests.airflow_schemas import airflow_schema_database
from tests.airflow_schemas.rows import asset, dag_run
from workers.db import make_engine
from workers.schema import resolve_tables
from workers.settings import Settings
from workers.store import NEVER, AssetScope, MetastoreStateBackend, TaskScope

RESULTS = Path(__file__).parent / "results"
REGION = "6f1c8a2e-1b7d-4f3a-9c55-0d2e4b6a8c10"
DAG, RUN, ASSET = "etl", "scheduled__1", ("orders", "s3://bucket/orders")


def operations(regions: bool) -> list[dict[str, Any]]:
    """What each side does, in order: (scope, key, value) writes, one overwrite, one delete."""
    task = {"kind": "task", "task_id": "extract", "map_index": -1, "region_id": None}
    ops: list[dict[str, Any]] = [
        {**task, "key": "cursor", "value": "42"},
        {**task, "key": "job_id", "value": "spark-application-1733300000"},
        {**task, "key": "unicode", "value": "Größe 東京 ✓"},
        {**task, "key": "long", "value": "x" * 5000},
        {**task, "map_index": 3, "key": "cursor", "value": "mapped-3"},
        {**task, "key": "cursor", "value": "43"},  # overwrite: upsert on the unique key
        {**task, "key": "gone", "value": "soon"},
        {**task, "key": "gone", "delete": True},
        {"kind": "asset", "key": "watermark", "value": "2026-12-01"},
    ]
    if regions:
        ops.insert(5, {**task, "map_index": 3, "region_id": REGION, "key": "cursor",
                       "value": "region-3"})
    return ops


def reads(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every distinct (scope, key) the operations touch."""
    seen: dict[str, dict[str, Any]] = {}
    for op in ops:
        key = {k: v for k, v in op.items() if k not in ("value", "delete")}
        seen[json.dumps(key, sort_keys=True)] = key
    return list(seen.values())


#: Run by Airflow's interpreter: argv[1] = "write" or "read"; stdin = the operations (JSON);
#: prints the values read (JSON). Only Airflow's public state backend is used.
AIRFLOW_SIDE = r"""
import json, sys, uuid
from sqlalchemy import select
from airflow.models.asset import AssetModel
from airflow.state.metastore import MetastoreBackend
from airflow.utils.session import create_session
try:
    from airflow._shared.state import AssetScope, TaskScope
except ImportError:
    from airflow.sdk._shared.state import AssetScope, TaskScope
import inspect
REGIONS = "region_id" in inspect.signature(TaskScope.__init__).parameters
mode, dag, run, name, uri = sys.argv[1:6]
ops = json.load(sys.stdin)
with create_session() as s:
    asset_id = s.scalar(select(AssetModel.id).where(AssetModel.name == name, AssetModel.uri == uri))
backend = MetastoreBackend()
def scope(op):
    if op["kind"] == "asset":
        return AssetScope(asset_id=asset_id)
    kw = {"region_id": uuid.UUID(op["region_id"])} if op["region_id"] else {}
    return TaskScope(dag, run, op["task_id"], op["map_index"], **kw)
out = []
for op in ops:
    if mode == "read":
        out.append(backend.get(scope(op), op["key"]))
    elif op.get("delete"):
        backend.delete(scope(op), op["key"])
    else:
        backend.set(scope(op), op["key"], op["value"])
print(json.dumps(out))
"""


def airflow_side(airflow: str, url: str, mode: str, ops: list[dict[str, Any]],
                 home: Path) -> list[Any]:
    driver = url.replace("postgresql://", "postgresql+psycopg2://").replace(
        "mysql://", "mysql+mysqldb://")
    env = {**os.environ, "AIRFLOW_HOME": str(home),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": driver,
           "AIRFLOW__CORE__LOAD_EXAMPLES": "false", "AIRFLOW__CORE__UNIT_TEST_MODE": "false"}
    python = str(Path(airflow).with_name("python"))
    proc = subprocess.run([python, "-c", AIRFLOW_SIDE, mode, DAG, RUN, *ASSET],
                          input=json.dumps(ops), env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"Airflow's backend failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result: list[Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def statesweep_side(engine: Engine, url: str, mode: str,
                    ops: list[dict[str, Any]]) -> list[Any]:
    backend = MetastoreStateBackend(Settings(database_url=url), engine, resolve_tables(engine))
    out: list[Any] = []
    for op in ops:
        scope: TaskScope | AssetScope
        if op["kind"] == "asset":
            scope = AssetScope(name=ASSET[0], uri=ASSET[1])
        else:
            region = uuid.UUID(op["region_id"]) if op["region_id"] else None
            scope = TaskScope(DAG, RUN, op["task_id"], op["map_index"], region)
        if mode == "read":
            out.append(backend.get(scope, op["key"]))
        elif op.get("delete"):
            backend.delete(scope, op["key"])
        else:
            # Airflow's backend.set() without expires_at stores none: the same here.
            backend.set(scope, op["key"], op["value"],
                        retention=NEVER if isinstance(scope, TaskScope) else None)
    return out


#: Columns that differ by design between two writes: the surrogate key and the clocks.
VOLATILE = {"id", "updated_at", "created_at", "expires_at"}


def rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Both state tables' rows, every column but the volatile ones, as comparable tuples."""
    out = {}
    with engine.connect() as conn:
        for name in ("task_state_store", "asset_state_store"):
            t = Table(name, MetaData(), autoload_with=conn)
            cols = [c for c in t.c if c.name not in VOLATILE]
            out[name] = sorted(
                tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
                for r in conn.execute(select(*cols)))
    return out


def database(dialect: str, version: str, stack: ExitStack) -> tuple[str, Engine]:
    url = stack.enter_context(airflow_schema_database(dialect, version))
    engine = make_engine(url)
    stack.callback(engine.dispose)
    dag_run(engine, DAG, RUN, "running")
    asset(engine, *ASSET)
    return url, engine


def main(argv: list[str] | None = None) -> int:
    args, airflow_version, version = parse_airflow_args(__doc__ or "",
                                                        "/opt/af-3.4/bin/airflow", argv)
    ops = operations(regions=version.startswith("3.4"))
    keys = reads(ops)
    lines = [f"# statesweep's writer vs Airflow {airflow_version}'s MetastoreBackend", "",
             f"Command: `python -m bench.writer_compare --airflow {args.airflow}`; schema "
             f"tests/airflow_schemas {version}; {len(ops)} operations, {len(keys)} (scope, key) "
             "read back by each side from both databases.", "",
             "| dialect | check | result |", "|---|---|---|"]
    failures = 0

    def check(dialect: str, what: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        lines.append(f"| {dialect} | {what} | {'same' if ok else 'DIFFERENT ' + detail} |")
        print(lines[-1], flush=True)

    for dialect in args.dialects.split(","):
        with ExitStack() as stack, tempfile.TemporaryDirectory() as home:
            url_s, eng_s = database(dialect, version, stack)
            url_a, eng_a = database(dialect, version, stack)
            statesweep_side(eng_s, url_s, "write", ops)
            airflow_side(args.airflow, url_a, "write", ops, Path(home))
            written_s, written_a = rows(eng_s), rows(eng_a)
            for table in written_s:
                check(dialect, f"{table} rows, column by column ({len(written_s[table])} rows)",
                      written_s[table] == written_a[table],
                      f"statesweep {written_s[table]!r} airflow {written_a[table]!r}")
            expect = statesweep_side(eng_s, url_s, "read", keys)
            check(dialect, "Airflow reads what statesweep wrote",
                  airflow_side(args.airflow, url_s, "read", keys, Path(home)) == expect)
            check(dialect, "statesweep reads what Airflow wrote",
                  statesweep_side(eng_a, url_a, "read", keys) == expect)
            check(dialect, "each side reads its own writes as the other does",
                  airflow_side(args.airflow, url_a, "read", keys, Path(home)) == expect)
    lines += ["", "Rows are compared on every column but id, updated_at, created_at and "
              "expires_at (Airflow's set() is given no expiry, statesweep's is told NEVER)."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"writer_compare_{version}.md").write_text("\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
