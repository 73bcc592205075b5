"""A run narrowed to dag ids (issue 23): on PostgreSQL, MariaDB and SQLite, in both namings and
both layouts, the dags planner deletes exactly what one plain DELETE with the same predicate
would, leaves every other dag's rows as they were, keeps each chunk within twice the batch, and
`auto` takes it for a small selection in a backlog and says why (and keeps the expiry index in
the steady state, where that reads less)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, and_, delete, select, update

from tests.cleanup_runs import memory_store
from tests.conftest import create_schema, database_now
from workers import cleanup, planners
from workers.chunk import run_local
from workers.exceptions import SettingsError
from workers.planners import ChunkRange
from workers.schema import Tables
from workers.seed import SeedSpec, seed
from workers.selection import Selection
from workers.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.newest_airflow_layout]

BATCH = 40
#: The seed's rows: 50 dags, one run of 100 rows each per 5,000 rows, 55% of them expired.
ROWS = 5000


@dataclass
class Table:
    engine: Engine
    tables: Tables
    settings: Settings

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def reseed(self, rows: int = ROWS) -> None:
        t = self.tables
        with self.engine.begin() as conn:
            for table in (t.task_state, t.asset_state, t.asset_active, t.asset, t.dag_run):
                conn.execute(delete(table))
        seed(self.engine, self.tables, SeedSpec(rows=rows, assets=6), database_now(self.engine))
        self.analyze()

    def analyze(self) -> None:
        """Fresh statistics, as a table in service has (SQLite keeps none)."""
        if self.dialect == "sqlite":
            return
        name = self.engine.dialect.identifier_preparer.format_table(self.tables.task_state)
        keyword = "ANALYZE" if self.dialect == "postgresql" else "ANALYZE TABLE"
        with self.engine.begin() as conn:  # PostgreSQL's ANALYZE is transactional
            conn.exec_driver_sql(f"{keyword} {name}").close()

    def rows(self) -> dict[int, tuple[Any, ...]]:
        t = self.tables.task_state
        with self.engine.connect() as conn:
            return {int(r.id): tuple(r) for r in conn.execute(
                select(t.c.id, t.c.dag_id, t.c.value, t.c.expires_at))}

    def plain_delete_ids(self, selection: Selection) -> set[int]:
        """The rows one DELETE of the whole selection would take: its own predicate (the
        expiry, the dag ids, the unfinished-run guard), with no range."""
        t = self.tables.task_state
        cutoff = cleanup.read_cutoff(self.engine)
        statement = cleanup.delete_statement(self.tables, ChunkRange("ids", 0, 2 ** 31 - 1),
                                             cutoff, selection=selection)
        with self.engine.connect() as conn:
            return set(conn.execute(select(t.c.id).where(statement.whereclause)).scalars())

    def run(self, planner: str, selection: Selection, batch_size: int | None = None
            ) -> tuple[Any, list[tuple[ChunkRange, int]]]:
        store = memory_store()
        settings = dataclasses.replace(self.settings, planner=planner)
        chunks: list[tuple[ChunkRange, int]] = []
        summary = run_local(settings, self.engine, self.tables, store, batch_size=batch_size,
                            selection=selection,
                            on_chunk=lambda _n, rng, rows: chunks.append((rng, rows)))
        record = store.get(summary.run_id)
        assert record is not None and record.state == "finished", record
        return record, chunks


@pytest.fixture
def table(db_url: str, naming: str, layout: str,
          make_settings: Callable[..., Settings]) -> Iterator[Table]:
    engine, tables = create_schema(db_url, naming, layout)
    settings = make_settings(database_url=db_url, run_store_url="memory://",
                             cleanup_batch_size=BATCH, max_chunks_in_flight=3)
    yield Table(engine, tables, settings)
    engine.dispose()


def _check_run(table: Table, planner: str, selection: Selection,
               batch_size: int | None = None) -> tuple[Any, list[tuple[ChunkRange, int]]]:
    """Run *planner* on *selection*; the rows left are exactly those a plain DELETE of the
    same predicate leaves, every other row unchanged."""
    before = table.rows()
    expected = table.plain_delete_ids(selection)
    assert expected, "the selection holds expired rows"
    record, chunks = table.run(planner, selection, batch_size)
    after = table.rows()
    assert set(before) - set(after) == expected
    assert after == {i: row for i, row in before.items() if i not in expected}
    assert record.rows_deleted == len(expected) == sum(rows for _, rows in chunks)
    return record, chunks


def test_auto_plans_a_small_selection_in_a_backlog_from_its_dags_rows(table: Table) -> None:
    """One dag id of 50, 55% of the table expired (a backlog, which auto would cut into
    physical ranges of the whole table): auto reads the dag's rows instead, and says why."""
    table.reseed()
    record, chunks = _check_run(table, "auto", Selection(dag_ids=("dag_7",)))
    assert record.planner == "dags", record.planner_reason
    assert record.planner_reason.startswith("auto: dag ids dag_7: their rows, not the "
                                            "table's ("), record.planner_reason
    assert "read through the dag_id index" in record.planner_reason
    assert {rng.kind for rng, _ in chunks} == {"dags"}
    # The dag's run holds ids 701..800: the plan spans its expired rows, not the table.
    assert chunks[0][0].lo >= 701 and chunks[-1][0].hi is not None
    assert chunks[-1][0].hi <= 801


def test_a_selection_with_nothing_expired_plans_no_chunk(table: Table) -> None:
    table.reseed(2000)
    before = table.rows()
    record, chunks = table.run("auto", Selection(dag_ids=("no_such_dag",)))
    assert (record.planner, record.rows_deleted, chunks) == ("dags", 0, [])
    assert "no expired rows of dag ids no_such_dag" in record.planner_reason
    assert table.rows() == before


@pytest.mark.every_airflow_layout
def test_the_dags_planner_deletes_what_a_plain_delete_would(table: Table) -> None:
    """Several dag ids far apart, one excluded again, rows of an unfinished run among them
    where dag_run has a state: exactly the plain DELETE's rows go, no other row changes."""
    table.reseed()
    if table.tables.has_run_state:
        dr = table.tables.dag_run
        with table.engine.begin() as conn:
            conn.execute(update(dr).where(dr.c.dag_id == "dag_20").values(state="running"))
    selection = Selection(dag_ids=("dag_3", "dag_20", "dag_41", "dag_9"),
                          exclude_dag_ids=("dag_9",))
    _, chunks = _check_run(table, "dags", selection)
    assert {rng.kind for rng, _ in chunks} == {"dags"}
    assert all(a.hi is not None and a.hi <= b.lo
               for (a, _), (b, _) in zip(chunks, chunks[1:], strict=False))


def test_dags_chunks_keep_within_twice_the_batch(table: Table) -> None:
    """--batch-size holds: three dags whose expired rows sit densely in their runs, one run's
    rows all expired at one instant (a bulk write), a batch of 10: no chunk deletes more than
    20 rows, and the run deletes exactly the plain DELETE's rows."""
    table.reseed()
    t = table.tables.task_state
    now = database_now(table.engine)
    with table.engine.begin() as conn:
        conn.execute(update(t).where(and_(t.c.dag_id == "dag_30", t.c.expires_at.is_not(None)))
                     .values(expires_at=now - dt.timedelta(minutes=5)))
    selection = Selection(dag_ids=("dag_5", "dag_30", "dag_44"))
    record, chunks = _check_run(table, "dags", selection, batch_size=10)
    rows = [n for _, n in chunks]
    assert max(rows) <= 20 and len([n for n in rows if n]) >= 10, rows
    assert record.planner == "dags"


def test_batch_size_zero_is_one_dags_chunk(table: Table) -> None:
    table.reseed(2000)
    _, chunks = _check_run(table, "dags", Selection(dag_ids=("dag_2", "dag_12")),
                           batch_size=0)
    assert len(chunks) == 1


def test_auto_keeps_the_expiry_index_in_the_steady_state_and_says_why(table: Table) -> None:
    """Where the table's expired rows are fewer than the selected dag's rows (read twice by a
    dags plan), auto keeps the expiry index, and its reason says why not the dags."""
    table.reseed()
    t = table.tables.task_state
    now = database_now(table.engine)
    with table.engine.begin() as conn:  # one expired row in a hundred: the steady state
        conn.execute(update(t).where(t.c.expires_at < now, t.c.id % 100 != 1)
                     .values(expires_at=now + dt.timedelta(days=1)))
    table.analyze()
    record, _ = _check_run(table, "auto", Selection(dag_ids=("dag_0",)))
    assert record.planner == "expiry", record.planner_reason
    assert "(dag ids dag_0 hold about " in record.planner_reason, record.planner_reason


def test_dags_forced_on_a_run_without_dag_ids_is_refused_before_any_delete(
        table: Table) -> None:
    table.reseed(400)
    before = table.rows()
    with table.engine.connect() as conn, pytest.raises(
            SettingsError, match=r"planner 'dags': this run cannot use it.*narrowed to dag"):
        planners.choose(conn, table.tables, cleanup.read_cutoff(table.engine), BATCH, "dags",
                        Selection(exclude_dag_ids=("dag_1",)))
    assert table.rows() == before


def test_dry_run_names_the_dags_planner_and_why(
        table: Table, db_url: str, naming: str, layout: str,
        make_settings: Callable[..., Settings]) -> None:
    if naming != "seed":
        pytest.skip("the dry run reads the settings' naming; one naming is enough here")
    from workers.cli.dispatch import dry_run

    table.reseed()
    settings = make_settings(database_url=db_url, run_store_url="memory://",
                             cleanup_batch_size=BATCH)
    out = dry_run(settings, None, Selection(dag_ids=("dag_7",)))
    assert out["planner"] == "dags", out["planner_reason"]
    assert out["planner_reason"].startswith("auto: dag ids dag_7: ")
    assert out["expired_rows"] == out["estimated_rows"] == 55
