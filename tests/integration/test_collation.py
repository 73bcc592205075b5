"""Keys and ids that differ only by case or accent are different rows on every dialect.

MySQL/MariaDB compare strings in the column's collation; their defaults fold case and accents,
so without binary id and key columns the writer's upsert silently replaced one key with another.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import func, insert, select

from tests.conftest import create_schema
from workers.settings import Settings
from workers.store import AssetScope, MetastoreStateBackend, TaskScope

pytestmark = pytest.mark.integration

LOWER = TaskScope("etl", "run_1", "extract")
UPPER = TaskScope("etl", "run_1", "Extract")
# Five writes that are five rows everywhere: case, accent, and the same key under two task ids
# differing only by case.
WRITES = [(LOWER, "offset"), (LOWER, "Offset"), (LOWER, "café"), (LOWER, "cafe"),
          (UPPER, "offset")]


def test_defect_mysql_case_and_accent_keys_do_not_collide(
        db_url: str, naming: str, make_settings: Callable[..., Settings]) -> None:
    engine, tables = create_schema(db_url, naming)
    try:
        with engine.begin() as conn:
            conn.execute(insert(tables.dag_run), [{"dag_id": "etl", "run_id": "run_1"},
                                                  {"dag_id": "ETL", "run_id": "Run_1"}])
            conn.execute(insert(tables.asset), [{"id": 1, "name": "orders",
                                                 "uri": "s3://lake/orders"}])
        backend = MetastoreStateBackend(make_settings(), engine, tables)
        for scope, key in WRITES:
            backend.set(scope, key, f"{scope.task_id}/{key}")
        # dag_id and run_id differing by case are separate runs too.
        backend.set(TaskScope("ETL", "Run_1", "extract"), "offset", "ETL/Run_1")
        asset = AssetScope(name="orders", uri="s3://lake/orders")
        backend.set(asset, "café", "accented")
        backend.set(asset, "cafe", "plain")

        t, a = tables.task_state, tables.asset_state
        with engine.connect() as conn:
            task_rows = conn.execute(select(func.count()).select_from(t)).scalar_one()
            asset_rows = conn.execute(select(func.count()).select_from(a)).scalar_one()
        assert (task_rows, asset_rows) == (len(WRITES) + 1, 2)
        for scope, key in WRITES:
            assert backend.get(scope, key) == f"{scope.task_id}/{key}"
        assert backend.get(TaskScope("ETL", "Run_1", "extract"), "offset") == "ETL/Run_1"
        assert backend.get(LOWER, "OFFSET") is None
        assert (backend.get(asset, "café"), backend.get(asset, "cafe")) == ("accented", "plain")
    finally:
        engine.dispose()
