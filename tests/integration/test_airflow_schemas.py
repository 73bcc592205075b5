"""The committed Airflow schemas (tests/airflow_schemas) load into fresh PostgreSQL and MariaDB
databases and hold what statesweep relies on: the state tables of each layout, one
alembic_version row, and dag_run.state."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect, text

from tests.airflow_schemas import VERSIONS, airflow_schema_database, load

pytestmark = pytest.mark.integration

DRIVERS = {"postgresql": "postgresql+psycopg://", "mysql": "mysql+pymysql://"}
TASK_STATE = {"id", "dag_run_id", "task_id", "key", "dag_id", "run_id", "value", "updated_at",
              "expires_at"}
LAYOUT_COLUMNS = {"3.3": {"map_index"}, "3.4": {"region_index", "region_id"}}
ASSET_STATE = {"asset_id", "key", "value", "updated_at"}


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
@pytest.mark.parametrize(("version", "layout"), VERSIONS)
def test_schema_loads_with_the_state_tables(dialect: str, version: str, layout: str) -> None:
    with airflow_schema_database(dialect, version) as url:
        engine = create_engine(url.replace(f"{dialect}://", DRIVERS[dialect], 1))
        try:
            insp = inspect(engine)
            tables = set(insp.get_table_names())
            assert {"task_state_store", "asset_state_store", "dag_run"} <= tables

            task_cols = {c["name"]: c for c in insp.get_columns("task_state_store")}
            assert TASK_STATE | LAYOUT_COLUMNS[layout] <= set(task_cols)
            other = LAYOUT_COLUMNS["3.4" if layout == "3.3" else "3.3"]
            assert not other & set(task_cols), f"{version} has {other & set(task_cols)}"
            if layout == "3.4":
                region_type = str(task_cols["region_id"]["type"]).upper()
                assert region_type == ("UUID" if dialect == "postgresql" else "BINARY(16)")
                assert not task_cols["region_id"]["nullable"]
            unique = {tuple(u["column_names"])
                      for u in insp.get_unique_constraints("task_state_store")}
            index = "map_index" if layout == "3.3" else "region_index"
            assert any(index in cols and "key" in cols for cols in unique), unique

            assert ASSET_STATE <= {c["name"] for c in insp.get_columns("asset_state_store")}
            assert "state" in {c["name"] for c in insp.get_columns("dag_run")}

            with engine.connect() as conn:
                revisions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
            assert len(revisions) == 1 and revisions[0][0]
        finally:
            engine.dispose()


def test_load_fails_loudly_with_the_clients_stderr() -> None:
    version = VERSIONS[0][0]
    with airflow_schema_database("postgresql", version) as url:
        with pytest.raises(RuntimeError, match="already exists"):
            load(url, version)
