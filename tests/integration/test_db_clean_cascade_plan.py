"""The query a dependant batch runs (cascade.batch_query) reads the rows under its parent chunk
through indexes, on Airflow's real schemas: EXPLAIN shows no full scan of the dependant table
(PostgreSQL: no Seq Scan of it; MariaDB: its access type neither ALL nor index), so a batch's
cost follows the chunk, not the table. A plan, not a timing: nothing here is timed."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, MetaData, text

from tests.airflow_schemas import airflow_schema_database
from tests.integration.test_db_clean import insert
from workers.db import make_engine
from workers.dbclean import cascade
from workers.dbclean import run as dbclean
from workers.dbclean import statements as sql
from workers.dbclean.rules import RULES, airflow_version

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

T = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
RUNS, TASKS = 4000, 5
#: The chunk: the last 600 dag runs (dag_run.id in (3400, 4000]), their 3000 rows of each
#: dependant at the end of its table, in batches of 1000. An unordered LIMIT was planned as a
#: scan of the dependant from its start, stopping early (as if the chunk's rows were spread
#: evenly through the table): a full scan, in fact.
CHUNK, BATCH = (3400, 4000), 1000


def populate(engine: Engine) -> None:
    """RUNS old finished dag runs of 4 dags, TASKS task instances each, an XCom and a task state
    row per task instance."""
    md = MetaData()
    md.reflect(engine)
    names = set(md.tables)
    runs, tis, xcoms, states = [], [], [], []
    for n in range(1, RUNS + 1):
        dag_id, run_id = f"dag{n % 4}", f"r{n}"
        runs.append({"id": n, "dag_id": dag_id, "run_id": run_id, "run_type": "scheduled",
                     "state": "success", "start_date": T - dt.timedelta(days=30, minutes=n),
                     "run_after": T - dt.timedelta(days=30, minutes=n)})
        for k in range(TASKS):
            ti_id = uuid.uuid4()
            tis.append({"id": ti_id, "dag_id": dag_id, "run_id": run_id, "task_id": f"t{k}",
                        "map_index": -1, "start_date": T - dt.timedelta(days=30),
                        "try_number": 1, "pool": "default_pool", "pool_slots": 1})
            if "xcom_v2" in names:
                xcoms.append({"id": uuid.uuid4(), "task_instance_id": ti_id, "key": "k",
                              "timestamp": T})
            else:
                xcoms.append({"dag_run_id": n, "task_id": f"t{k}", "map_index": -1, "key": "k",
                              "dag_id": dag_id, "run_id": run_id, "timestamp": T})
            state = {"id": len(states) + 1, "dag_run_id": n, "task_id": f"t{k}", "key": "k",
                     "dag_id": dag_id, "run_id": run_id, "value": "v", "updated_at": T,
                     "expires_at": T}
            state.update({"region_index": -1, "region_id": uuid.UUID(int=0)}
                         if "region_id" in md.tables["task_state_store"].c
                         else {"map_index": -1})
            states.append(state)
    with engine.begin() as conn:
        insert(conn, md.tables["dag_run"], runs)
        insert(conn, md.tables["task_instance"], tis)
        insert(conn, md.tables["xcom_v2" if "xcom_v2" in names else "xcom"], xcoms)
        insert(conn, md.tables["task_state_store"], states)
    analyze = "ANALYZE" if engine.dialect.name == "postgresql" else "ANALYZE TABLE"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for name in ("dag_run", "task_instance", "xcom_v2" if "xcom_v2" in names else "xcom",
                     "task_state_store"):
            conn.exec_driver_sql(f"{analyze} {name}")


@pytest.fixture(params=[("postgresql", "3.3.2"), ("mysql", "3.3.2"), ("postgresql", "3.4.0b2"),
                        ("mysql", "3.4.0b2")], ids=lambda p: f"{p[0]}-{p[1]}")
def airflow_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    dialect, version = request.param
    with airflow_schema_database(dialect, version) as url:
        engine = make_engine(url)
        try:
            populate(engine)
            yield engine
        finally:
            engine.dispose()


def _pg_scans(node: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(node type, relation) of every scan in a PostgreSQL JSON plan."""
    if "Relation Name" in node:
        yield node["Node Type"], node["Relation Name"]
    for child in node.get("Plans", []):
        yield from _pg_scans(child)


def full_scans(conn: Connection, query: Any) -> tuple[set[str], str]:
    """The tables EXPLAIN says *query* reads whole, and the plan as text."""
    compiled = query.compile(conn, compile_kwargs={"literal_binds": True})
    if conn.dialect.name == "postgresql":
        plan = conn.execute(text(f"EXPLAIN (FORMAT JSON) {compiled}")).scalar_one()
        plan = json.loads(plan) if isinstance(plan, str) else plan
        scans = list(_pg_scans(plan[0]["Plan"]))
        return {rel for kind, rel in scans if kind == "Seq Scan"}, repr(scans)
    rows = [dict(r._mapping) for r in conn.execute(text(f"EXPLAIN {compiled}"))]
    # ALL reads the table, index the whole of one of its indexes (how MariaDB ran the EXISTS
    # chain this query replaced: every xcom row of idx_xcom_task_instance, per batch).
    return {r["table"] for r in rows if r["type"] in ("ALL", "index")}, repr(rows)


def test_a_dependant_batch_reads_the_chunks_rows_through_indexes(airflow_engine: Engine) -> None:
    """A dag_run chunk's dependants that hold rows (task_instance, xcom or 3.4's xcom_v2 under
    it, task_state_store): no full scan of them or of the tables between them and dag_run."""
    engine = airflow_engine
    with engine.connect() as conn:
        version = airflow_version(conn)
        rule = RULES[version]["dag_run"]
        t = sql.reflect(conn, "dag_run")
        root_cond = [*sql.eligible(conn, rule, t, T), *sql.in_range(t, (CHUNK[0],), (CHUNK[1],))]
        dependants = dbclean._dependants(conn, cascade.ForeignKeys(conn), t)
        filled = {"task_instance", "task_state_store", "xcom_v2" if version == "3.4" else "xcom"}
        checked = set()
        for path, target, tables in dependants:
            if target.name not in filled:
                continue  # an empty table: a full scan of nothing is the planner's right choice
            query = cascade.batch_query(conn, tables, path, root_cond, BATCH)
            scanned, plan = full_scans(conn, query)
            below_root = {e.child for e in path}
            assert not scanned & below_root, f"{target.name}: full scan of {scanned}: {plan}"
            checked.add(target.name)
    assert checked == filled
