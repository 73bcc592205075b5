"""The planners on PostgreSQL, MariaDB and SQLite, in both table namings: each plan covers exactly
the expired rows (a whole run, compared row by row), planning costs a fixed number of probes
whatever the table's size, `auto` says what it chose and why, and a planner forced on a database
that cannot serve it is a settings error before anything is deleted."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, delete, event, text

from tests.cleanup_runs import memory_store
from tests.conftest import create_schema, database_now
from workers import cleanup, planners
from workers.chunk import run_local
from workers.exceptions import SettingsError
from workers.planners import ChunkRange
from workers.schema import Tables
from workers.seed import SeedSpec, expected_survivors, seed, task_state_rows
from workers.settings import Settings

pytestmark = pytest.mark.integration

BATCH = 40


@dataclass
class Table:
    url: str
    engine: Engine
    tables: Tables
    settings: Settings

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def servable(self) -> list[str]:
        return ["blocks", "ids", "walk"] if self.dialect == "postgresql" else ["ids", "walk"]

    def run(self, planner: str, batch_size: int | None = None) -> tuple[Any, list[ChunkRange]]:
        """A whole run, chunk by chunk in this process; returns its record and the chunks."""
        store = memory_store()
        settings = dataclasses.replace(self.settings, planner=planner)
        chunks: list[ChunkRange] = []
        summary = run_local(settings, self.engine, self.tables, store, batch_size=batch_size,
                            on_chunk=lambda _n, rng, _rows: chunks.append(rng))
        record = store.get(summary.run_id)
        assert record is not None and record.state == "finished", record
        assert store.active_run() is None
        return record, chunks


    def reseed(self, rows: int) -> SeedSpec:
        """Empty the tables and seed *rows* rows again (seed() writes explicit ids)."""
        t = self.tables
        with self.engine.begin() as conn:
            for table in (t.task_state, t.asset_state, t.asset_active, t.asset, t.dag_run):
                conn.execute(delete(table))
        spec = SeedSpec(rows=rows, assets=6)
        seed(self.engine, self.tables, spec, database_now(self.engine))
        return spec


@pytest.fixture
def table(db_url: str, naming: str, layout: str,
          make_settings: Callable[..., Settings]) -> Iterator[Table]:
    engine, tables = create_schema(db_url, naming, layout)
    settings = make_settings(database_url=db_url, run_store_url="memory://",
                             cleanup_batch_size=BATCH, max_chunks_in_flight=3)
    yield Table(db_url, engine, tables, settings)
    engine.dispose()


def test_each_planner_deletes_exactly_the_expired_rows(table: Table) -> None:
    for planner in table.servable():
        spec = table.reseed(3000)
        record, chunks = table.run(planner)
        assert task_state_rows(table.engine, table.tables) == expected_survivors(spec), planner
        assert (record.planner, record.rows_deleted) == (planner, 1650)
        assert len(chunks) > 3, planner  # several windows' worth, so top-ups are exercised
        assert {c.kind for c in chunks} == {planner}
        # Ranges tile upwards without overlap; only a blocks plan ends open (pages added later).
        assert all(a.hi is not None and a.hi <= b.lo for a, b in zip(chunks, chunks[1:],
                                                                   strict=False))
        assert (chunks[-1].hi is None) == (planner == "blocks")


def test_batch_size_zero_is_one_chunk(table: Table) -> None:
    for planner in table.servable():
        spec = table.reseed(800)
        record, chunks = table.run(planner, batch_size=0)
        assert len(chunks) == 1 and record.chunks_done == 1, planner
        assert task_state_rows(table.engine, table.tables) == expected_survivors(spec), planner


def _planning_statements(table: Table, planner: str) -> list[str]:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(" ".join(statement.split()))

    cutoff = cleanup.read_cutoff(table.engine)
    event.listen(table.engine, "before_cursor_execute", record)
    try:
        with table.engine.connect() as conn:
            planners.choose(conn, table.tables, cutoff, 10, planner)
    finally:
        event.remove(table.engine, "before_cursor_execute", record)
    return statements


def test_planning_costs_a_fixed_number_of_probes(table: Table) -> None:
    """Invariant 7: the statements a plan issues do not grow with the table (ten times the
    rows, the same statements), and none of them fetches the id list."""
    bound = {"blocks": 4, "ids": 2 + planners.ids.DENSITY_WINDOWS, "walk": 2}
    table.reseed(2000)
    few_by = {p: _planning_statements(table, p) for p in table.servable()}
    table.reseed(20000)
    for planner in table.servable():
        few, many = few_by[planner], _planning_statements(table, planner)
        assert len(few) == len(many) <= bound[planner], (planner, many)
        reads_rows = [s for s in many if s.upper().startswith("SELECT")
                      and not any(w in s.upper() for w in ("LIMIT", "COUNT(", "PG_", "AMNAME"))]
        assert reads_rows == [], (planner, reads_rows)


def test_forced_planner_the_database_cannot_serve_is_refused_before_any_delete(
        table: Table) -> None:
    table.reseed(400)
    if table.dialect == "postgresql":
        pytest.skip("PostgreSQL serves every planner")
    before = task_state_rows(table.engine, table.tables)
    store = memory_store()
    settings = dataclasses.replace(table.settings, planner="blocks")
    with pytest.raises(SettingsError, match=r"STATESWEEP_PLANNER='blocks'.*cannot use it"):
        run_local(settings, table.engine, table.tables, store)
    assert task_state_rows(table.engine, table.tables) == before
    [record] = store.recent()
    assert record.state == "failed" and "STATESWEEP_PLANNER" in record.error
    assert store.active_run() is None


def test_auto_says_what_it_chose_and_why(table: Table) -> None:
    spec = table.reseed(3000)
    record, _ = table.run("auto")
    assert task_state_rows(table.engine, table.tables) == expected_survivors(spec)
    if table.dialect == "postgresql":
        assert record.planner == "blocks"
        assert record.planner_reason.startswith("auto: PostgreSQL heap table; ")
    else:
        assert record.planner == "ids"
        assert record.planner_reason.startswith(
            f"auto: {table.dialect} stores rows in primary-key order; ")


def test_auto_walks_the_index_where_few_rows_expired_on_postgresql(
        table: Table) -> None:
    table.reseed(5000)
    if table.dialect != "postgresql":
        pytest.skip("the density choice is PostgreSQL's (blocks or walk)")
    name = table.tables.task_state.name
    with table.engine.begin() as conn:
        # Keep one row in a thousand expired (0.1% of the table): the rest expire tomorrow.
        conn.execute(text(f"UPDATE {name} SET expires_at = now() + interval '1 day' "  # noqa: S608
                          f"WHERE expires_at < now() AND id % 1000 <> 1"))
        expected = {(int(r.id), str(r.value)) for r in conn.execute(text(
            f"SELECT id, value FROM {name} WHERE expires_at IS NULL OR expires_at > now()"))}  # noqa: S608
    record, _ = table.run("auto")
    assert record.planner == "walk"
    assert "under 0.2%" in record.planner_reason and record.planner_reason.startswith("auto: ")
    assert task_state_rows(table.engine, table.tables) == expected
