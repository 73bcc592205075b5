"""Invariant 14 on every dialect: a chunk's DELETE keeps the expired state of a dag run that is
queued or running at that DELETE, whatever it was when the run was planned or its earlier
chunks ran; and on PostgreSQL the check reads the unfinished runs through Airflow's partial
indexes, never a scan of dag_run (issue 23: that scan was protection's cost). The real Airflow
schemas run the same rule in test_airflow_db.py (PostgreSQL and MariaDB)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, insert, select, text, update

from tests.airflow_schemas import VERSIONS, airflow_schema_database
from tests.conftest import create_schema, database_now
from workers.cleanup import count_protected, delete_range, delete_statement
from workers.db import make_engine
from workers.planners import ChunkRange
from workers.schema import Tables, resolve_tables

pytestmark = pytest.mark.integration

EVERYTHING = ChunkRange("ids", 0, 2**31 - 1)


@dataclass
class Airflowish:
    engine: Engine
    tables: Tables
    now: dt.datetime

    def add_runs(self, states: dict[int, str | None], rows: int = 3) -> None:
        """Dag runs *states* (id -> state), each with *rows* expired state rows, one that
        never expires and one that expires tomorrow."""
        t = self.tables
        expiries = [self.now - dt.timedelta(hours=1)] * rows + [
            None, self.now + dt.timedelta(days=1)]
        with self.engine.begin() as conn:
            conn.execute(insert(t.dag_run), [{"id": i, "dag_id": "d", "run_id": f"r{i}",
                                              "state": s} for i, s in states.items()])
            conn.execute(insert(t.task_state), [
                {"dag_run_id": i, "task_id": "t", **t.scope_columns(-1, None), "key": f"k{k}",
                 "dag_id": "d", "run_id": f"r{i}", "value": "v", "updated_at": self.now,
                 "expires_at": e} for i in states for k, e in enumerate(expiries)])

    def set_state(self, run: int, state: str | None) -> None:
        dr = self.tables.dag_run
        with self.engine.begin() as conn:
            conn.execute(update(dr).where(dr.c.id == run).values(state=state))

    def expired_by_run(self) -> dict[int, int]:
        ts = self.tables.task_state
        out: dict[int, int] = {}
        with self.engine.connect() as conn:
            for run in conn.execute(select(ts.c.dag_run_id).where(ts.c.expires_at < self.now)
                                    ).scalars():
                out[run] = out.get(run, 0) + 1
        return out

    def ids_of(self, run: int) -> list[int]:
        ts = self.tables.task_state
        with self.engine.connect() as conn:
            return list(conn.execute(select(ts.c.id).where(ts.c.dag_run_id == run)
                                     .order_by(ts.c.id)).scalars())


@pytest.fixture
def af(db_url: str) -> Iterator[Airflowish]:
    """statesweep's schema with Airflow's dag_run.state and its indexes on the unfinished
    states: partial ones where the database has them (PostgreSQL, SQLite), (state, dag_id) on
    MariaDB, as Airflow 3.3.2's own schemas have."""
    engine, _ = create_schema(db_url)
    partial = engine.dialect.name != "mysql"
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE dag_run ADD COLUMN state VARCHAR(50)"))
        for state in ("queued", "running"):
            conn.execute(text(f"CREATE INDEX idx_dag_run_{state}_dags ON dag_run (state, dag_id)"
                              + (f" WHERE state = '{state}'" if partial else "")))
    tables = resolve_tables(engine)
    assert tables.has_run_state
    yield Airflowish(engine, tables, database_now(engine))
    engine.dispose()


def test_only_state_of_queued_or_running_dag_runs_is_kept(af: Airflowish) -> None:
    """Finished (success, failed) and state-less runs lose their expired state; queued and
    running keep it; never-expiring and future rows stay either way; protection off deletes
    all that expired. The count the run record shows agrees."""
    af.add_runs({1: "queued", 2: "running", 3: "success", 4: "failed", 5: None})
    with af.engine.connect() as conn:
        assert count_protected(conn, af.tables, af.now).rows == 6
    assert delete_range(af.engine, af.tables, EVERYTHING, af.now) == 9
    assert af.expired_by_run() == {1: 3, 2: 3}
    assert delete_range(af.engine, af.tables, EVERYTHING, af.now, protect=False) == 6
    assert af.expired_by_run() == {}
    assert len(af.ids_of(1)) == 2  # the never-expiring and the future row


def test_a_dag_run_that_starts_mid_run_is_judged_at_each_delete(af: Airflowish) -> None:
    """The unfinished runs are read by each DELETE itself, never once per run or per plan: a
    dag run that is re-run (cleared to queued) after the plan and after the run's first
    chunk, just before the chunk holding its rows, keeps them; one that finishes meanwhile
    loses them to that same chunk."""
    af.add_runs({1: "success", 2: "success", 3: "running"})
    first, second = af.ids_of(1), af.ids_of(2) + af.ids_of(3)
    chunks = [ChunkRange("ids", first[0], first[-1] + 1), ChunkRange("ids", second[0],
                                                                     second[-1] + 1)]
    assert delete_range(af.engine, af.tables, chunks[0], af.now) == 3
    af.set_state(2, "queued")   # cleared between the run's first chunk and its second
    af.set_state(3, "success")  # and the one that was running finishes
    assert delete_range(af.engine, af.tables, chunks[1], af.now) == 3
    assert af.expired_by_run() == {2: 3}
    af.set_state(2, "running")
    assert delete_range(af.engine, af.tables, EVERYTHING, af.now) == 0  # idempotent, still kept
    af.set_state(2, "success")
    assert delete_range(af.engine, af.tables, EVERYTHING, af.now) == 3
    assert af.expired_by_run() == {}


def test_many_unfinished_dag_runs_are_all_kept(af: Airflowish) -> None:
    """A large set of unfinished runs (the set each DELETE reads and probes per row) keeps
    every one of them, on every dialect's way of evaluating it."""
    states: dict[int, str | None] = {i: ("running" if i % 3 == 0 else "queued"
                                         if i % 3 == 1 else "success") for i in range(1, 1501)}
    af.add_runs(states, rows=1)
    assert delete_range(af.engine, af.tables, EVERYTHING, af.now) == 500
    kept = af.expired_by_run()
    assert sorted(kept) == [i for i, s in states.items() if s != "success"]


def _assert_partial_index_plan(engine: Engine, tables: Tables, now: dt.datetime) -> None:
    for rng in (ChunkRange("blocks", 0, 10), ChunkRange("expiry", 0, None, 0, 0)):
        sql = delete_statement(tables, rng, now).compile(
            dialect=engine.dialect, compile_kwargs={"literal_binds": True})
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            plan = "\n".join(conn.execute(text(f"EXPLAIN {sql}")).scalars())
        assert "Seq Scan on dag_run" not in plan, plan
        assert "idx_dag_run_queued_dags" in plan and "idx_dag_run_running_dags" in plan, plan


def test_postgres_reads_unfinished_runs_through_airflows_partial_indexes(
        af: Airflowish) -> None:
    """The check finds the unfinished runs from Airflow's two partial indexes, never a scan of
    dag_run: ``state IN ('queued', 'running')`` matched neither index, and every chunk read
    all of dag_run, which grows with Airflow's history (issue 23). Scans are priced out so a
    small table cannot hide the difference; the plan's shape is asserted, never a time."""
    if af.engine.dialect.name != "postgresql":
        pytest.skip("partial-index plans are PostgreSQL's")
    af.add_runs({1: "running", 2: "success"})
    _assert_partial_index_plan(af.engine, af.tables, af.now)


@pytest.mark.parametrize("version", [v for v, _ in VERSIONS])
def test_the_real_airflow_schemas_partial_indexes_serve_the_check(version: str) -> None:
    """The same on the schemas ``airflow db migrate`` made (their own partial indexes)."""
    with airflow_schema_database("postgresql", version) as url:
        engine = make_engine(url)
        try:
            _assert_partial_index_plan(engine, resolve_tables(engine), database_now(engine))
        finally:
            engine.dispose()
