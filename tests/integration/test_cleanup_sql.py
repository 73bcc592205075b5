"""The cleanup statements on real databases, each dialect and naming: the cutoff predicate at
the boundary, the walk's cuts, idempotent range deletes that re-check expiry, and the batched
orphaned-asset-state sweep that never touches task state. (Block ranges: test_blocks_pg.py;
whole runs per planner: test_planners.py.)"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, delete, insert, select

from tests.cleanup_runs import memory_store
from tests.conftest import create_schema, database_now
from workers.chunk import run_local
from workers.cleanup import count_expired, delete_range, sweep_orphaned_asset_state
from workers.exceptions import InvalidArgument
from workers.planners import PLANNERS, ChunkRange, walk
from workers.schema import Tables
from workers.settings import Settings
from workers.store import NEVER, MetastoreStateBackend, TaskScope

pytestmark = pytest.mark.integration

FAR_FUTURE = dt.timedelta(days=365 * 100)
EVERYTHING = ChunkRange("ids", 0, 2**31 - 1)  # the id column is a 32-bit integer


def ids(lo: int, hi: int | None) -> ChunkRange:
    return ChunkRange("ids", lo, hi)


@dataclass
class Db:
    engine: Engine
    tables: Tables
    now: dt.datetime

    def add_task_rows(self, expiries: list[dt.datetime | None]) -> list[int]:
        """Insert one row per expiry (keys k0, k1, ...) in id order; returns their ids."""
        t = self.tables.task_state
        start = len(self.task_rows())
        rows = [{"dag_run_id": 1, "task_id": "t", **self.tables.scope_columns(-1, None),
                 "key": f"k{start + i}",
                 "dag_id": "d", "run_id": "r", "value": f"v{start + i}",
                 "updated_at": self.now, "expires_at": e} for i, e in enumerate(expiries)]
        with self.engine.begin() as conn:
            conn.execute(insert(t), rows)
            return list(conn.execute(select(t.c.id).where(t.c.key.in_([r["key"] for r in rows]))
                                     .order_by(t.c.id)).scalars())

    def task_rows(self) -> dict[int, tuple[str, str, dt.datetime | None]]:
        t = self.tables.task_state
        with self.engine.connect() as conn:
            return {r.id: (r.key, r.value, r.expires_at)
                    for r in conn.execute(select(t.c.id, t.c.key, t.c.value, t.c.expires_at))}

    def expired_ids(self, cutoff: dt.datetime) -> list[int]:
        rows = self.task_rows().items()
        return sorted(i for i, (_, _, e) in rows if e is not None and e < cutoff)

    def asset_rows(self) -> set[tuple[int, str]]:
        s = self.tables.asset_state
        with self.engine.connect() as conn:
            return {(int(r.asset_id), str(r.key)) for r in conn.execute(select(s))}

    def add_assets(self, n: int, inactive: set[int], keys: int) -> None:
        """Assets 1..n, all but *inactive* active, each with *keys* state rows."""
        t = self.tables
        with self.engine.begin() as conn:
            conn.execute(insert(t.asset), [{"id": a, "name": f"a{a}", "uri": f"s3://a{a}"}
                                           for a in range(1, n + 1)])
            conn.execute(insert(t.asset_active), [{"name": f"a{a}", "uri": f"s3://a{a}"}
                                                  for a in range(1, n + 1) if a not in inactive])
        self.fill_asset_state(n, keys)

    def fill_asset_state(self, n: int, keys: int) -> None:
        s = self.tables.asset_state
        with self.engine.begin() as conn:
            conn.execute(delete(s))
            conn.execute(insert(s), [{"asset_id": a, "key": f"k{j:02d}", "value": "v",
                                      "updated_at": self.now}
                                     for a in range(1, n + 1) for j in range(keys)])


@pytest.fixture
def db(db_url: str, naming: str, layout: str) -> Iterator[Db]:
    engine, tables = create_schema(db_url, naming, layout)
    with engine.begin() as conn:
        conn.execute(insert(tables.dag_run), [{"id": 1, "dag_id": "d", "run_id": "r"}])
    yield Db(engine, tables, database_now(engine))
    engine.dispose()


def test_only_rows_strictly_before_the_cutoff_are_deleted(db: Db) -> None:
    cutoff = db.now
    tick = dt.timedelta(microseconds=1)
    ids = db.add_task_rows([cutoff - dt.timedelta(days=9), cutoff - tick, cutoff, cutoff + tick,
                            None])
    assert count_expired(db.engine, db.tables, cutoff) == 2
    # Over the whole id range: the predicate, not the range, decides.
    assert delete_range(db.engine, db.tables, EVERYTHING, cutoff) == 2
    assert sorted(db.task_rows()) == ids[2:]


def test_null_expiry_is_never_deleted(db: Db) -> None:
    ids = db.add_task_rows([None, db.now - dt.timedelta(days=2), None,
                            db.now - dt.timedelta(days=1)])
    assert delete_range(db.engine, db.tables, EVERYTHING, db.now) == 2
    assert sorted(db.task_rows()) == [ids[0], ids[2]]


# expired, expired, future, expired, never: 3 of every 5 rows expired, ids interleaved.
PATTERN = ["expired", "expired", "future", "expired", "never"]


def _interleaved(db: Db, n: int) -> list[int]:
    expiry = {"expired": db.now - dt.timedelta(hours=1), "future": db.now + dt.timedelta(days=1),
              "never": None}
    return db.add_task_rows([expiry[PATTERN[i % 5]] for i in range(n)])


def _walk(db: Db, cutoff: dt.datetime, batch: int) -> list[tuple[int, int | None]]:
    plan = PLANNERS["walk"]
    with db.engine.connect() as conn:
        p = plan.plan(conn, db.tables, cutoff, batch)
        ranges: list[tuple[int, int | None]] = []
        lo: int | None = p.start
        while lo is not None:
            hi, lo_next = walk.cut(conn, db.tables, cutoff, lo, p.end, batch)
            ranges.append((lo, hi))
            lo = lo_next
    return ranges


def test_walk_cuts_batch_size_expired_rows_per_range(db: Db) -> None:
    _interleaved(db, 60)
    cutoff = db.now
    expired = db.expired_ids(cutoff)
    assert len(expired) == 36
    for batch in (1, 7, 12, 36, 100):
        ranges = _walk(db, cutoff, batch)
        sizes = [batch] * (len(expired) // batch) + ([len(expired) % batch]
                                                     if len(expired) % batch else [])
        inside = [[i for i in expired if lo <= i < (hi or 10**12)] for lo, hi in ranges]
        assert [len(x) for x in inside] == sizes, batch
        assert [i for x in inside for i in x] == expired  # each expired id in one range, in order
        assert all(x[0] == lo for x, (lo, _) in zip(inside, ranges, strict=True))
    assert _walk(db, cutoff, 0) == [(expired[0], expired[-1] + 1)]


def test_nothing_expired_plans_nothing(db: Db) -> None:
    db.add_task_rows([None, db.now + dt.timedelta(days=1)])
    with db.engine.connect() as conn:
        for name in ("ids", "walk"):
            for batch in (0, 1, 10):
                assert PLANNERS[name].plan(conn, db.tables, db.now, batch).empty, (name, batch)


def test_delete_range_deletes_its_range_once(db: Db) -> None:
    ids_ = _interleaved(db, 30)
    cutoff = db.now
    expired = db.expired_ids(cutoff)
    first, *rest = _walk(db, cutoff, 5)
    assert delete_range(db.engine, db.tables, ids(*first), cutoff) == 5
    assert db.expired_ids(cutoff) == expired[5:]  # only the range's rows went
    assert delete_range(db.engine, db.tables, ids(*first), cutoff) == 0
    for r in rest:
        inside = [i for i in expired if r[0] <= i < (r[1] or 10**12)]
        assert delete_range(db.engine, db.tables, ids(*r), cutoff) == len(inside) > 0
        assert delete_range(db.engine, db.tables, ids(*r), cutoff) == 0
    assert sorted(db.task_rows()) == sorted(set(ids_) - set(expired))


def test_row_refreshed_after_planning_survives_its_chunk(
    db: Db, make_settings: Callable[..., Settings]
) -> None:
    _interleaved(db, 20)
    cutoff = db.now
    chunks = _walk(db, cutoff, 4)
    rows = db.task_rows()
    # Two rows inside the first chunk, refreshed by a writer after the plan was made.
    lo, hi = chunks[0]
    refreshed = [i for i in db.expired_ids(cutoff) if lo < i < (hi or 10**12)][:2]
    backend = MetastoreStateBackend(make_settings(), db.engine, db.tables)
    scope = TaskScope("d", "r", "t")
    backend.set(scope, rows[refreshed[0]][0], "fresh", retention=dt.timedelta(hours=1))
    backend.set(scope, rows[refreshed[1]][0], "kept", retention=NEVER)
    expired_before = len(db.expired_ids(cutoff))
    deleted = sum(delete_range(db.engine, db.tables, ids(*c), cutoff) for c in chunks)
    assert deleted == expired_before
    after = db.task_rows()
    assert [after[i][1] for i in refreshed] == ["fresh", "kept"]
    assert db.expired_ids(cutoff) == []


def test_sweep_deletes_exactly_orphaned_asset_state_in_batches(db: Db) -> None:
    inactive = {1, 4, 7, 10}
    db.add_assets(10, inactive, keys=5)
    _interleaved(db, 15)
    task_before = db.task_rows()
    live = {(a, f"k{j:02d}") for a in range(1, 11) if a not in inactive for j in range(5)}
    for batch, sizes in ((6, [6, 6, 6, 2]), (5, [5, 5, 5, 5]), (1, [1] * 20), (0, [20]),
                         (100, [20])):
        db.fill_asset_state(10, 5)
        seen: list[int] = []
        result = sweep_orphaned_asset_state(db.engine, db.tables, batch,
                                            on_batch=lambda rows, _ms, seen=seen: seen.append(rows))
        assert seen == sizes, batch
        assert (result.rows, result.batches) == (20, len(sizes))
        assert db.asset_rows() == live
        assert db.task_rows() == task_before  # never task state, expired or not
    assert sweep_orphaned_asset_state(db.engine, db.tables, 5).rows == 0


def test_active_is_matched_on_name_and_uri_together(db: Db) -> None:
    db.add_assets(2, {2}, keys=2)
    with db.engine.begin() as conn:
        # Same name, another uri: asset 2 is still not active.
        conn.execute(insert(db.tables.asset_active), [{"name": "a2", "uri": "s3://other"}])
    assert sweep_orphaned_asset_state(db.engine, db.tables, 10).rows == 2
    assert db.asset_rows() == {(1, "k00"), (1, "k01")}


def test_reactivated_asset_keeps_its_state(db: Db) -> None:
    db.add_assets(6, {2, 5, 6}, keys=3)
    aa = db.tables.asset_active

    def reactivate(name: str) -> None:
        with db.engine.begin() as conn:
            conn.execute(insert(aa), [{"name": name, "uri": f"s3://{name}"}])

    reactivate("a2")  # before the sweep
    calls: list[int] = []

    def during(rows: int, _ms: float) -> None:
        calls.append(rows)
        if len(calls) == 1:
            reactivate("a6")  # after the first batch, before the batch holding its rows

    result = sweep_orphaned_asset_state(db.engine, db.tables, 2, on_batch=during)
    assert result.rows == 3  # only asset 5's rows
    assert {a for a, _ in db.asset_rows()} == {1, 2, 3, 4, 6}


def test_retention_cleanup_never_touches_asset_state(
    db: Db, make_settings: Callable[..., Settings]
) -> None:
    db.add_assets(6, {1, 2}, keys=3)  # live and orphaned asset state
    _interleaved(db, 25)
    assets_before = db.asset_rows()
    registry = memory_store()
    summary = run_local(make_settings(run_store_url="memory://", max_chunks_in_flight=2),
                        db.engine, db.tables, registry, batch_size=4)
    record = registry.get(summary.run_id)
    assert record is not None and (record.state, record.rows_deleted) == ("finished", 15)
    # A cutoff ahead of the database clock is refused at the DELETE itself: nothing goes.
    with pytest.raises(InvalidArgument, match="in the future"):
        delete_range(db.engine, db.tables, EVERYTHING, db.now + FAR_FUTURE)
    assert len(db.task_rows()) == 10  # 5 that expire tomorrow, 5 that never expire
    assert db.asset_rows() == assets_before
