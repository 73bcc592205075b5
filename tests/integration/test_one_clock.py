"""Invariant 2, one clock: the cutoff is the database's now(), read once per run; the clock of
the process that plans or deletes never decides what has expired.

PostgreSQL resolves an unqualified now() through search_path, so a test database can be given a
clock of its own: public.now() returning 2001, with search_path = public, pg_catalog. A row that
expired yesterday by every machine's clock has, by the database's clock, 25 years to live.
"""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import insert, select, text

from tests.cleanup_runs import memory_store
from tests.conftest import create_schema
from workers.chunk import run_local
from workers.db import make_engine
from workers.settings import Settings
from workers.store import MetastoreStateBackend, TaskScope

pytestmark = pytest.mark.integration

DB_NOW = dt.datetime(2001, 1, 1, tzinfo=dt.UTC)
UTC = dt.UTC


def test_cutoff_comes_from_the_database_clock_not_the_workers(pg_url: str) -> None:
    engine, tables = create_schema(pg_url, "seed")
    with engine.begin() as conn:
        conn.execute(text("CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql "
                          "AS $$ SELECT timestamptz '2001-01-01 00:00:00+00' $$"))
        conn.execute(insert(tables.dag_run).values(id=1, dag_id="d", run_id="r"))
        conn.execute(insert(tables.task_state), [
            {"id": i, "dag_run_id": 1, "task_id": "t", "map_index": -1, "key": f"k{i}",
             "dag_id": "d", "run_id": "r", "value": "v", "updated_at": DB_NOW, "expires_at": e}
            for i, e in enumerate([
                dt.datetime(2000, 6, 1, tzinfo=UTC),  # expired by the database's clock
                dt.datetime.now(UTC) - dt.timedelta(days=1),  # expired by the worker's clock only
                None,
            ], start=1)
        ])
    engine.dispose()

    clocked_url = pg_url + "?options=-csearch_path%3Dpublic,pg_catalog"
    clocked = make_engine(clocked_url)
    with clocked.connect() as conn:
        assert conn.execute(select(text("now()"))).scalar_one() == DB_NOW  # the fake clock holds
    settings = Settings.from_env({"STATESWEEP_DATABASE_URL": clocked_url,
                                  "STATESWEEP_RUN_STORE_URL": "memory://",
                                  "STATESWEEP_CLEANUP_BATCH_SIZE": "1"})
    registry = memory_store()
    summary = run_local(settings, clocked, tables, registry, source="test")

    assert dt.datetime.fromisoformat(summary.cutoff) == DB_NOW
    record = registry.get(summary.run_id)
    assert record is not None and record.state == "finished" and record.rows_deleted == 1
    with clocked.connect() as conn:
        left = conn.execute(select(tables.task_state.c.id).order_by("id")).scalars().all()
    assert left == [2, 3]

    # The writer shares the clock: a key written now expires 30 days after the database's now.
    MetastoreStateBackend(settings, clocked, tables).set(TaskScope("d", "r", "t"), "new", "v")
    with clocked.connect() as conn:
        expires = conn.execute(select(tables.task_state.c.expires_at)
                               .where(tables.task_state.c.key == "new")).scalar_one()
    assert expires == DB_NOW + dt.timedelta(days=30)
    clocked.dispose()
