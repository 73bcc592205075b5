"""statesweep on real Airflow metadata databases, made by Airflow's own `airflow db migrate`
(tests/airflow_schemas: Airflow 3.3 and 3.4, PostgreSQL and MySQL/MariaDB): it reads the layout
(3.3's map_index, 3.4's region_index and region_id), writes and reads state as Airflow's backend
stores it, cleans expired state while keeping a running dag run's, sweeps orphaned asset state,
and leaves Airflow's schema as it found it."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    inspect,
    select,
    text,
)

from tests.airflow_schemas import VERSIONS, airflow_schema_database
from tests.airflow_schemas.rows import dag_run, insert_row
from tests.cleanup_runs import memory_store
from tests.conftest import database_now
from workers.chunk import run_local
from workers.cleanup import sweep_orphaned_asset_state
from workers.db import make_engine
from workers.schema import LEGACY_REGION, resolve_tables
from workers.settings import Settings
from workers.store import MetastoreStateBackend, TaskScope

pytestmark = pytest.mark.integration

LAYOUT = dict(VERSIONS)


@pytest.fixture(params=[(d, v) for v, _ in VERSIONS for d in ("postgresql", "mariadb")],
                ids=lambda p: f"{p[0]}-airflow-{p[1]}")
def airflow(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, str]]:
    dialect, version = request.param
    with airflow_schema_database(dialect, version) as url:
        engine = make_engine(url)
        yield engine, version
        engine.dispose()


def structure(engine: Engine) -> dict[str, Any]:
    insp = inspect(engine)
    return {t: (sorted((c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(t)),
                sorted(str(i["name"]) for i in insp.get_indexes(t)))
            for t in sorted(insp.get_table_names())}


def test_layout_and_run_state_are_read_from_airflows_own_schema(
        airflow: tuple[Engine, str]) -> None:
    engine, version = airflow
    tables = resolve_tables(engine)
    assert (tables.naming, tables.layout, tables.has_run_state) == (
        "airflow", LAYOUT[version], True)
    assert tables.index_column.name == ("region_index" if LAYOUT[version] == "3.4"
                                        else "map_index")


def test_writer_round_trips_state_as_airflow_stores_it(
        airflow: tuple[Engine, str], make_settings: Callable[..., Settings]) -> None:
    engine, version = airflow
    dag_run(engine, "etl", "run_1", "running")
    tables = resolve_tables(engine)
    backend = MetastoreStateBackend(make_settings(), engine, tables)
    plain = TaskScope("etl", "run_1", "extract", 3)
    backend.set(plain, "cursor", "42")
    assert backend.get(plain, "cursor") == "42"
    t = tables.task_state
    if LAYOUT[version] == "3.4":
        region = uuid.UUID("6f1c8a2e-1b7d-4f3a-9c55-0d2e4b6a8c10")
        regional = TaskScope("etl", "run_1", "extract", 3, region)
        backend.set(regional, "cursor", "7")
        assert (backend.get(regional, "cursor"), backend.get(plain, "cursor")) == ("7", "42")
        raw_column = "region_id"
        with engine.connect() as conn:
            raw = {str(r[1]): r[0] for r in conn.execute(
                text(f"SELECT {raw_column}, value FROM task_state_store"))}  # noqa: S608
        # As Airflow keeps it: a uuid on PostgreSQL, the UUID's 16 bytes on MySQL.
        expect = ((lambda u: u) if engine.dialect.name == "postgresql"
                  else (lambda u: u.bytes))
        assert {v: (r if isinstance(r, uuid.UUID) else bytes(r)) for v, r in raw.items()} == {
            "42": expect(LEGACY_REGION), "7": expect(region)}
    else:
        with engine.connect() as conn:
            assert conn.execute(select(t.c.map_index)).scalar_one() == 3
    backend.delete(plain, "cursor")
    assert backend.get(plain, "cursor") is None


def test_cleanup_keeps_a_running_dag_runs_state_and_sweeps_orphans_on_airflows_schema(
        airflow: tuple[Engine, str], make_settings: Callable[..., Settings]) -> None:
    engine, _ = airflow
    before = structure(engine)
    done = dag_run(engine, "etl", "done", "success")
    running = dag_run(engine, "etl", "running", "running")
    tables = resolve_tables(engine)
    now = database_now(engine)
    rows = []
    for pk, run_id in ((done, "done"), (running, "running")):
        for i, delta in enumerate((-2, -1, 1, 2)):
            rows.append({"dag_run_id": pk, "task_id": "t", **tables.scope_columns(-1, None),
                         "key": f"k{i}", "dag_id": "etl", "run_id": run_id, "value": "v",
                         "updated_at": now, "expires_at": now + dt.timedelta(hours=delta)})
    with engine.begin() as conn:
        conn.execute(tables.task_state.insert(), rows)
        active = insert_row(conn, "asset", name="a", uri="s3://a", group="asset")
        gone = insert_row(conn, "asset", name="b", uri="s3://b", group="asset")
        insert_row(conn, "asset_active", name="a", uri="s3://a")
        for asset_id in (active, gone):
            conn.execute(tables.asset_state.insert(), [
                {"asset_id": asset_id, "key": f"k{j}", "value": "v", "updated_at": now}
                for j in range(3)])
    settings = make_settings(run_store_url="memory://")
    store = memory_store()
    summary = run_local(settings, engine, tables, store, batch_size=1)
    record = store.get(summary.run_id)
    assert record is not None and (record.state, record.rows_deleted) == ("finished", 2)
    t = tables.task_state
    with engine.connect() as conn:
        left = {(r.run_id, r.key) for r in conn.execute(select(t.c.run_id, t.c.key))}
    assert left == {("done", "k2"), ("done", "k3"), *(("running", f"k{i}") for i in range(4))}
    swept = sweep_orphaned_asset_state(engine, tables, batch_size=2)
    assert swept.rows == 3
    with engine.connect() as conn:
        assert set(conn.execute(select(tables.asset_state.c.asset_id)).scalars()) == {active}
    assert structure(engine) == before


def test_doctor_names_the_airflow_it_found(airflow: tuple[Engine, str],
                                           isolation: dict[str, str]) -> None:
    """doctor says which Airflow the task-state columns and the alembic revision say this is,
    and that a running dag run's state is kept."""
    from tests.integration.test_cli import invoke

    engine, version = airflow
    url = engine.url.render_as_string(hide_password=False)
    result = invoke("doctor", "--format", "json",
                    env={**isolation, "STATESWEEP_DATABASE_URL": url,
                         "STATESWEEP_RUN_STORE_URL": "memory://"})
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    layout = checks["task state layout"]
    assert layout["status"] == "ok", layout
    expect = ("Airflow 3.4 (region_index, region_id)" if LAYOUT[version] == "3.4"
              else "Airflow 3.3 (map_index)")
    assert layout["detail"].startswith(expect + ", alembic revision ")
    assert "state of queued and running dag runs is kept" in layout["detail"]
