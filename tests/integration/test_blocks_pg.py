"""Block (ctid) ranges on real PostgreSQL, both namings, with real concurrent writers: the chunk
DELETE is a Tid Range Scan, a row refreshed after planning survives, rows on pages appended after
planning are covered by the open last chunk, a chunk run twice (or at once by two workers)
deletes nothing more and is counted once; NULL expiry and asset state are never touched."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, text
from sqlalchemy.dialects import postgresql

from tests.cleanup_runs import Message, Outbox, deliver, memory_store
from tests.conftest import create_schema, database_now
from workers import chunk, cleanup, coordinator
from workers.planners import ChunkRange
from workers.runs import Gate, RunRecord, RunStore
from workers.schema import Tables
from workers.seed import (
    ROWS_PER_RUN,
    SeedSpec,
    asset_state_rows,
    expected_survivors,
    kind_of,
    seed,
    task_state_rows,
)
from workers.settings import Settings
from workers.store import MetastoreStateBackend, TaskScope

pytestmark = pytest.mark.integration

SPEC = SeedSpec(rows=6000, assets=9)
EXPIRED = sum(kind_of(i, SPEC) == "expired" for i in range(SPEC.rows))


@dataclass
class Pg:
    settings: Settings
    engine: Engine
    tables: Tables
    store: RunStore

    def plan(self, outbox: Outbox) -> RunRecord:
        """Plan a blocks run; its chunk messages wait in *outbox*."""
        s = coordinator.coordinate(self.settings, self.engine, self.tables, self.store, outbox)
        record = self.store.get(s.run_id)
        assert record is not None and record.planner == "blocks" and s.status == "started"
        return record

    def run(self, m: Message, outbox: Outbox | None = None) -> chunk.ChunkResult:
        return chunk.run_chunk(self.settings, self.engine, self.tables, self.store,
                               outbox if outbox is not None else Outbox(), m.args())

    def refresh(self, row_id: int, value: str, key: str = "") -> None:
        """The writer's upsert of seeded row *row_id*'s key (or of a new *key* in its scope),
        with a fresh expiry."""
        i = row_id - 1
        r = i // ROWS_PER_RUN
        scope = TaskScope(f"dag_{r % 50}", f"run_{r}", f"task_{(i // 10) % 10}")
        MetastoreStateBackend(self.settings, self.engine, self.tables).set(
            scope, key or f"key_{i}", value, retention=dt.timedelta(days=1))


@pytest.fixture
def pg(pg_url: str, naming: str, make_settings: Callable[..., Settings]) -> Iterator[Pg]:
    engine, tables = create_schema(pg_url, naming)
    seed(engine, tables, SPEC, database_now(engine))
    settings = make_settings(database_url=pg_url, run_store_url="memory://", planner="blocks",
                             cleanup_batch_size=300, max_chunks_in_flight=4)
    yield Pg(settings, engine, tables, memory_store())
    engine.dispose()


def test_chunk_delete_is_a_tid_range_scan(pg: Pg) -> None:
    cutoff = database_now(pg.engine)
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    for rng in (ChunkRange("blocks", 3, 9), ChunkRange("blocks", 9, None)):
        compiled = cleanup.delete_statement(pg.tables, rng, cutoff).compile(dialect=dialect)
        with pg.engine.connect() as conn, conn.begin() as tx:
            plan = "\n".join(r[0] for r in conn.exec_driver_sql(
                f"EXPLAIN {compiled}", compiled.params))
            tx.rollback()
        assert "Tid Range Scan" in plan, plan
        assert f"'({rng.lo},0)'::tid" in plan and "expires_at <" in plan, plan


def test_row_refreshed_after_planning_survives(pg: Pg) -> None:
    assets = asset_state_rows(pg.engine, pg.tables)
    outbox = Outbox()
    record = pg.plan(outbox)
    expired = sorted(i + 1 for i in range(SPEC.rows) if kind_of(i, SPEC) == "expired")
    refreshed = expired[::50]
    for row_id in refreshed:  # committed by another session after the plan, before the DELETEs
        pg.refresh(row_id, f"fresh_{row_id}")
    deliver(pg.settings, pg.engine, pg.tables, pg.store, outbox)
    assert task_state_rows(pg.engine, pg.tables) == expected_survivors(SPEC) | {
        (i, f"fresh_{i}") for i in refreshed}
    done = pg.store.get(record.run_id)
    assert done is not None and (done.state, done.rows_deleted) == (
        "finished", EXPIRED - len(refreshed))
    assert asset_state_rows(pg.engine, pg.tables) == assets


def test_rows_on_pages_appended_after_planning_are_covered_by_the_open_last_chunk(
        pg: Pg) -> None:
    outbox = Outbox()
    record = pg.plan(outbox)
    cutoff = dt.datetime.fromisoformat(record.cutoff)
    t = pg.tables.task_state
    new = [{"dag_run_id": 1, "task_id": "late", "map_index": -1, "key": f"late_{n}",
            "dag_id": "dag_0", "run_id": "run_0", "value": f"late_{n}", "updated_at": cutoff,
            "expires_at": cutoff - dt.timedelta(hours=1) if n % 2 else None}
           for n in range(3000)]
    with pg.engine.begin() as conn:
        conn.execute(insert(t), new)
        appended = {int(r.id): (int(r.block), r.expires_at) for r in conn.execute(text(
            f"SELECT id, (ctid::text::point)[0] AS block, expires_at FROM {t.name} "  # noqa: S608
            f"WHERE task_id = 'late'"))}
    assert min(b for b, _ in appended.values()) >= int(record.end) - 1  # on the last page or after
    assert max(b for b, _ in appended.values()) > int(record.end)  # pages the plan never counted
    deliver(pg.settings, pg.engine, pg.tables, pg.store, outbox)
    late_live = {(i, f"late_{i}") for i, (_, e) in appended.items() if e is None}
    survivors = task_state_rows(pg.engine, pg.tables)
    late_values = {(i, v) for i, v in survivors if v.startswith("late_")}
    assert survivors - late_values == expected_survivors(SPEC)
    assert {i for i, _ in late_values} == {i for i, _ in late_live}
    done = pg.store.get(record.run_id)
    assert done is not None and done.rows_deleted == EXPIRED + 1500


def test_a_chunk_run_twice_or_by_two_workers_at_once_is_counted_once(pg: Pg) -> None:
    outbox = Outbox()
    record = pg.plan(outbox)
    first = outbox.queue.popleft()
    results: list[chunk.ChunkResult] = []
    barrier = threading.Barrier(2)

    def worker() -> None:
        barrier.wait()
        results.append(pg.run(first, outbox))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # One copy is counted as the chunk, whichever reached the run store first: the one that
    # deleted, or the one that waited on its row locks and then found the rows gone (it can
    # win the race to the count). Each row went in one commit, so one copy found nothing, and
    # the deleting copy's rows are counted either way (the run's total is checked below).
    assert len([r for r in results if r.counted]) == 1
    assert sorted(r.rows for r in results)[0] == 0 and sum(r.rows for r in results) > 0
    again = pg.run(first)  # redelivered after it finished
    assert (again.status, again.rows, again.counted) == ("duplicate", 0, False)
    deliver(pg.settings, pg.engine, pg.tables, pg.store, outbox)
    done = pg.store.get(record.run_id)
    assert done is not None and (done.state, done.rows_deleted, done.chunks_done) == (
        "finished", EXPIRED, done.chunks_planned)
    assert task_state_rows(pg.engine, pg.tables) == expected_survivors(SPEC)


def test_concurrent_writers_during_a_run_lose_nothing(pg: Pg) -> None:
    """Writers refresh expired keys and add rows while two workers delete: every live row and
    every write survives, every expired row not refreshed is gone, and the count is exact."""
    assets = asset_state_rows(pg.engine, pg.tables)
    settings = dataclasses.replace(pg.settings, cleanup_batch_size=100)
    pg = dataclasses.replace(pg, settings=settings)
    outbox = Outbox()
    record = pg.plan(outbox)
    expired = [i + 1 for i in range(SPEC.rows) if kind_of(i, SPEC) == "expired"]
    lock, stop = threading.Lock(), threading.Event()
    written: list[int] = []
    added: list[int] = []

    def writer() -> None:
        for n, row_id in enumerate(expired[::7]):
            if stop.is_set():
                break
            pg.refresh(row_id, f"fresh_{row_id}")
            written.append(row_id)
            if n % 5 == 0:  # and new rows, some on pages appended after planning
                pg.refresh(row_id, f"fresh_new_{n}", key=f"new_{n}")
                added.append(n)

    def worker() -> None:
        while True:
            with lock:
                if not outbox.queue:
                    return
                m = outbox.queue.popleft()
            pg.run(m, outbox)

    writing = threading.Thread(target=writer)
    writing.start()
    workers = [threading.Thread(target=worker) for _ in range(2)]
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    stop.set()
    writing.join()
    deliver(pg.settings, pg.engine, pg.tables, pg.store, outbox)  # anything sent at the end

    survivors = task_state_rows(pg.engine, pg.tables)
    fresh = {(i, v) for i, v in survivors if v.startswith("fresh_")}
    assert survivors - fresh == expected_survivors(SPEC)
    assert sorted(v for _, v in fresh) == sorted(
        [f"fresh_{i}" for i in written] + [f"fresh_new_{n}" for n in added])
    assert written  # the writer ran while the workers deleted
    gone = set(expired) - {i for i, _ in survivors}
    done = pg.store.get(record.run_id)
    assert done is not None and (done.state, done.rows_deleted) == ("finished", len(gone))
    with pg.engine.connect() as conn:
        t = pg.tables.task_state
        left = conn.execute(select(t.c.id).where(
            t.c.expires_at < dt.datetime.fromisoformat(record.cutoff))).scalars().all()
    assert left == []
    assert asset_state_rows(pg.engine, pg.tables) == assets


def _commit_and_die(pg: Pg, m: Message, *, roll_back: bool = False) -> tuple[int, str]:
    """A worker that deletes chunk *m* and dies between its COMMIT and its FINISH (or, with
    *roll_back*, whose transaction rolls back after it noted the commit): (rows, its note)."""
    args = m.args()
    notes = chunk.CommitNotes(pg.store, args, pg.engine.dialect.name)

    def note_then_maybe_fail(conn: Any, rows: int, xid: int | None) -> None:
        # The id the chunk's first statement read is the transaction's own: txid_status of
        # the note then tells a copy whether these rows committed.
        assert xid == conn.execute(text("SELECT txid_current()")).scalar_one()
        notes.before_commit(conn, rows, xid)
        if roll_back:
            raise RuntimeError("the connection died before COMMIT")

    try:
        rows = cleanup.delete_range(pg.engine, pg.tables, args.range, args.cutoff,
                                    before_commit=note_then_maybe_fail)
    except RuntimeError:
        rows = 0
    assert len(notes.own) == 1
    return rows, notes.own[0]


def _finishes_exactly(pg: Pg, outbox: Outbox, run_id: str) -> None:
    """The rest of the run delivered: it finishes having counted every expired row once."""
    deliver(pg.settings, pg.engine, pg.tables, pg.store, outbox)
    done = pg.store.get(run_id)
    assert done is not None and (done.state, done.rows_deleted) == ("finished", EXPIRED)


def test_a_chunk_whose_worker_died_between_commit_and_finish_is_counted_by_its_copy(
        pg: Pg) -> None:
    outbox = Outbox()
    record = pg.plan(outbox)
    first = outbox.queue.popleft()
    rows, note = _commit_and_die(pg, first)
    assert rows > 0 and pg.store.commit_notes(record.run_id, first.number) == {note: rows}
    again = pg.run(first, outbox)  # sent again once the dead worker's heartbeat lapsed
    assert (again.status, again.counted) == ("deleted", True)
    assert pg.store.commit_notes(record.run_id, first.number) == {}
    _finishes_exactly(pg, outbox, record.run_id)
    assert task_state_rows(pg.engine, pg.tables) == expected_survivors(SPEC)


def test_a_slow_workers_late_finish_after_its_copy_counted_its_commit_adds_nothing(
        pg: Pg) -> None:
    outbox = Outbox()
    record = pg.plan(outbox)
    first = outbox.queue.popleft()
    rows, note = _commit_and_die(pg, first)
    pg.run(first, outbox)  # the copy counts the slow worker's commit with its own
    counted, _ = pg.store.finish_chunk(  # ... then the slow worker's own FINISH arrives
        record.run_id, first.number, "blocks", rows, 0, lock_ttl=600, window=4,
        resend_after=60, gate=Gate(), notes=(note,))
    assert not counted
    _finishes_exactly(pg, outbox, record.run_id)


def test_a_noted_commit_that_rolled_back_is_dropped_not_counted(pg: Pg) -> None:
    outbox = Outbox()
    record = pg.plan(outbox)
    first = outbox.queue.popleft()
    rows, note = _commit_and_die(pg, first, roll_back=True)
    assert rows == 0 and note in pg.store.commit_notes(record.run_id, first.number)
    again = pg.run(first, outbox)
    assert again.rows > 0 and pg.store.commit_notes(record.run_id, first.number) == {}
    _finishes_exactly(pg, outbox, record.run_id)
    assert task_state_rows(pg.engine, pg.tables) == expected_survivors(SPEC)
