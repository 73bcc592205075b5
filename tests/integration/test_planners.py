"""The planners on PostgreSQL, MariaDB and SQLite, in both table namings: each plan covers exactly
the expired rows (a whole run, compared row by row), planning costs a fixed number of probes
whatever the table's size, `auto` says what it chose and why, and a planner forced on a database
that cannot serve it is a settings error before anything is deleted."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, delete, event, func, insert, or_, select, update

from tests.cleanup_runs import memory_store
from tests.conftest import create_schema, database_now
from workers import cleanup, planners
from workers.chunk import run_local
from workers.exceptions import SettingsError
from workers.planners import ChunkRange
from workers.schema import Tables
from workers.seed import SeedSpec, expected_survivors, seed, task_state_rows
from workers.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.newest_airflow_layout]

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
        every = ["ids", "walk", "expiry"]
        return ["blocks", *every] if self.dialect == "postgresql" else every

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


@pytest.mark.every_airflow_layout
def test_each_planner_deletes_exactly_the_expired_rows(table: Table) -> None:
    for planner in table.servable():
        spec = table.reseed(3000)
        record, chunks = table.run(planner)
        assert task_state_rows(table.engine, table.tables) == expected_survivors(spec), planner
        assert (record.planner, record.rows_deleted) == (planner, 1650)
        assert len(chunks) > 3, planner  # several windows' worth, so top-ups are exercised
        assert {c.kind for c in chunks} == {planner}
        # Ranges tile upwards without overlap; only a blocks plan (pages added later) and an
        # expiry plan (up to the cutoff) end open.
        assert all(a.hi is not None and (a.hi, a.hi_id) <= (b.lo, b.lo_id)
                   for a, b in zip(chunks, chunks[1:], strict=False))
        assert (chunks[-1].hi is None) == (planner in ("blocks", "expiry"))


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
    bound = {"blocks": 4, "ids": 1 + planners.ids.DENSITY_WINDOWS, "walk": 1, "expiry": 2}
    table.reseed(2000)
    few_by = {p: _planning_statements(table, p) for p in table.servable()}
    table.reseed(20000)
    for planner in table.servable():
        few, many = few_by[planner], _planning_statements(table, planner)
        assert len(few) == len(many) <= bound[planner], (planner, many)
        # Every statement is bounded (LIMIT), a count, a catalog read, or an aggregate over the
        # expires_at index: none returns rows of the table.
        reads_rows = [s for s in many if s.upper().startswith("SELECT")
                      and not any(w in s.upper() for w in ("LIMIT", "COUNT(", "PG_", "AMNAME",
                                                           "MIN(", "MAX("))]
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
    # The seed expires 55% of the rows: a backlog, cut into physical ranges.
    assert record.planner_reason.startswith("auto: backlog: "), record.planner_reason
    if table.dialect == "postgresql":
        assert record.planner == "blocks"
        assert "PostgreSQL heap table; " in record.planner_reason
    else:
        assert record.planner == "ids"
        assert f"{table.dialect} stores rows in primary-key order; " in record.planner_reason


def _keep_expired(table: Table, every: int) -> set[tuple[int, str]]:
    """Leave one expired row in *every* expired ones (the rest expire tomorrow); returns the
    rows a correct run leaves."""
    t = table.tables.task_state
    now = database_now(table.engine)
    with table.engine.begin() as conn:
        conn.execute(update(t).where(t.c.expires_at < now, t.c.id % every != 1)
                     .values(expires_at=now + dt.timedelta(days=1)))
        return {(int(r.id), str(r.value)) for r in conn.execute(
            select(t.c.id, t.c.value).where(or_(t.c.expires_at.is_(None),
                                                 t.c.expires_at > now)))}


def test_auto_reads_the_expiry_index_in_the_steady_state(table: Table) -> None:
    """Where a small share of the table expired (the steady state), every dialect's `auto`
    cuts intervals of the expires_at index and says why."""
    table.reseed(5000)
    expected = _keep_expired(table, 100)  # about 0.5% of the table expired
    record, chunks = table.run("auto")
    assert record.planner == "expiry", record.planner_reason
    assert record.planner_reason.startswith("auto: ")
    assert f"(under {planners.backlog_fraction(table.dialect):.0%})" in record.planner_reason
    assert task_state_rows(table.engine, table.tables) == expected
    assert {c.kind for c in chunks} == {"expiry"}


def test_an_outlying_id_cuts_no_empty_chunks(table: Table) -> None:
    """A backlog whose ids hold one outlier far above the rest (10**9 among ids below 10**4):
    `auto` sees that an ids plan would cut thousands of empty ranges and reads the index."""
    table.reseed(2000)
    if table.dialect == "postgresql":
        pytest.skip("PostgreSQL's backlog plan is pages, not ids")
    t = table.tables.task_state
    now = database_now(table.engine)
    with table.engine.begin() as conn:
        conn.execute(insert(t).values(
            id=10 ** 9, dag_run_id=1, task_id="far", key="far", dag_id="dag_0", run_id="run_0",
            value="far", updated_at=now, expires_at=now - dt.timedelta(hours=1),
            **table.tables.scope_columns(-1, None)))
    if table.dialect != "sqlite":  # InnoDB's row estimate, current (it refreshes in the back)
        with table.engine.connect() as conn:
            conn.exec_driver_sql(f"ANALYZE TABLE {t.name}").all()
    record, chunks = table.run("auto")
    assert record.planner == "expiry", record.planner_reason
    # MariaDB's catalog counts the rows, so auto sees the sparse ids; SQLite estimates the rows
    # from the id span, which the outlier stretches, so it sees a small expired share.
    assert ("sparse ids" in record.planner_reason) == (table.dialect != "sqlite")
    assert record.rows_deleted == 1100 + 1
    assert len(chunks) <= -(-(1100 + 1) // BATCH) + 1


def test_every_planner_keeps_chunks_within_twice_the_batch(table: Table) -> None:
    """--batch-size holds in every planner (invariant 13): no chunk deletes more than twice
    the batch, with a bulk write of many rows sharing one expires_at, and after a run left
    empty leading pages behind."""
    t = table.tables.task_state
    for planner in table.servable():
        table.reseed(3000)
        now = database_now(table.engine)
        with table.engine.begin() as conn:  # 300 rows written at one instant: one expires_at
            conn.execute(update(t).where(t.c.id > 2000, t.c.id <= 2300)
                         .values(expires_at=now - dt.timedelta(minutes=5)))
            conn.execute(delete(t).where(t.c.id <= 1000))  # a previous run's empty pages
            expired = conn.execute(select(func.count()).select_from(t)
                                   .where(t.c.expires_at < now)).scalar()
        store = memory_store()
        settings = dataclasses.replace(table.settings, planner=planner)
        deleted: list[int] = []
        # A block chunk is one page at least: the batch here is more than a page's rows.
        run_local(settings, table.engine, table.tables, store, batch_size=100,
                  on_chunk=lambda _n, _rng, rows, into=deleted: into.append(rows))
        assert sum(deleted) == expired and max(deleted) <= 2 * 100, (planner, deleted)


def test_a_row_refreshed_after_its_expiry_chunk_was_cut_survives(table: Table) -> None:
    """Invariant 1 in the expiry planner: the cut reads expires_at, the writer then refreshes
    the row (a new expires_at, outside every interval cut so far), and the DELETE re-checks."""
    table.reseed(400)
    t = table.tables.task_state
    cutoff = cleanup.read_cutoff(table.engine)
    with table.engine.connect() as conn:
        plan = planners.choose(conn, table.tables, cutoff, BATCH, "expiry")
        lo = planners.expiry.decode_key(plan.cursor)
        hi = planners.expiry.cut(conn, table.tables, cutoff, lo, BATCH)
    rng = planners.expiry.chunk_range(lo, hi)
    with table.engine.connect() as conn:
        in_chunk = conn.execute(select(t.c.id).where(*cleanup.range_condition(table.tables, rng),
                                                     t.c.expires_at < cutoff)
                                .order_by(t.c.id)).scalars().all()
    assert 0 < len(in_chunk) <= BATCH
    refreshed = in_chunk[0]
    with table.engine.begin() as conn:
        conn.execute(update(t).where(t.c.id == refreshed)
                     .values(expires_at=database_now(table.engine) + dt.timedelta(days=1)))
    deleted = cleanup.delete_range(table.engine, table.tables, rng, cutoff)
    assert deleted == len(in_chunk) - 1
    with table.engine.connect() as conn:
        assert conn.execute(select(t.c.id).where(t.c.id.in_(in_chunk))).scalars().all() == [
            refreshed]


def test_auto_plans_the_steady_state_from_the_servers_estimate(table: Table) -> None:
    """With statistics, `auto` takes PostgreSQL's estimate of the expired rows from the first
    expired key (EXPLAIN) instead of counting them: the steady state's plan reads no expired
    row twice. InnoDB's estimate of a range on a table this small spans whole pages (2,480
    rows for 50), so MariaDB counts here, and SQLite, which has no estimate, always does:
    either way the run is the same."""
    table.reseed(5000)
    expected = _keep_expired(table, 100)
    name = table.engine.dialect.identifier_preparer.format_table(table.tables.task_state)
    keyword = "ANALYZE TABLE" if table.dialect in ("mysql", "mariadb") else "ANALYZE"
    with table.engine.begin() as conn:
        conn.exec_driver_sql(f"{keyword} {name}")
    statements = _planning_statements(table, "auto")
    counts = [s for s in statements if "COUNT(" in s.upper()]
    if table.dialect == "postgresql":
        assert counts == [], statements
        assert any(s.upper().startswith("EXPLAIN") for s in statements), statements
    else:
        assert len(counts) <= 1, statements
    record, _ = table.run("auto")
    assert record.planner == "expiry", record.planner_reason
    if table.dialect == "postgresql":
        assert "by the server's estimate" in record.planner_reason, record.planner_reason
    assert task_state_rows(table.engine, table.tables) == expected
