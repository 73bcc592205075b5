"""The state-store writer on each dialect and naming: what it writes, what it reads back, the
expires_at it computes from settings and per-key retention, and the errors it raises."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, update

from tests.conftest import create_schema, database_now
from workers.exceptions import InvalidArgument, NotFound
from workers.schema import LEGACY_REGION, Tables
from workers.settings import Settings
from workers.store import (
    NEVER,
    AssetScope,
    BaseStateBackend,
    MetastoreStateBackend,
    TaskScope,
    load_backend,
)

pytestmark = pytest.mark.integration

RUN = TaskScope("etl", "run_1", "extract")
OTHER_TASK = TaskScope("etl", "run_1", "load")
OTHER_RUN = TaskScope("etl", "run_2", "extract")
ASSET_ID = 1
ASSET = AssetScope(name="orders", uri="s3://lake/orders")


@dataclass
class Store:
    engine: Engine
    tables: Tables
    make: Callable[..., MetastoreStateBackend]

    def row(self, scope: TaskScope, key: str) -> Any:
        """The stored row, expired or not: id, value, expires_at, updated_at."""
        t = self.tables.task_state
        with self.engine.connect() as conn:
            return conn.execute(
                select(t.c.id, t.c.value, t.c.expires_at, t.c.updated_at).where(
                    t.c.dag_id == scope.dag_id, t.c.run_id == scope.run_id,
                    t.c.task_id == scope.task_id, self.tables.index_column == scope.map_index,
                    t.c.key == key)
            ).one_or_none()

    def count(self, table: str = "task_state") -> int:
        t = getattr(self.tables, table)
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(t)).scalar_one())

    def now(self) -> dt.datetime:
        return database_now(self.engine)


@pytest.fixture
def store(db_url: str, naming: str, layout: str,
          make_settings: Callable[..., Settings]) -> Iterator[Store]:
    engine, tables = create_schema(db_url, naming, layout)
    with engine.begin() as conn:
        conn.execute(insert(tables.dag_run), [{"dag_id": "etl", "run_id": "run_1"},
                                              {"dag_id": "etl", "run_id": "run_2"}])
        conn.execute(insert(tables.asset), [{"id": ASSET_ID, "name": "orders",
                                             "uri": "s3://lake/orders"},
                                            {"id": 2, "name": "users", "uri": "s3://lake/users"}])

    def make(**settings: object) -> MetastoreStateBackend:
        return MetastoreStateBackend(make_settings(**settings), engine, tables)

    yield Store(engine, tables, make)
    engine.dispose()


def within(value: dt.datetime | None, lo: dt.datetime, hi: dt.datetime) -> bool:
    return value is not None and lo <= value <= hi


def test_set_then_get_with_default_retention_from_settings(store: Store) -> None:
    backend = store.make(default_retention_days=3)
    t0 = store.now()
    backend.set(RUN, "cursor", "42")
    t1 = store.now()
    assert backend.get(RUN, "cursor") == "42"
    row = store.row(RUN, "cursor")
    assert row is not None
    assert within(row.expires_at, t0 + dt.timedelta(days=3), t1 + dt.timedelta(days=3))
    assert within(row.updated_at, t0, t1)
    assert backend.get(RUN, "absent") is None
    assert backend.get(OTHER_TASK, "cursor") is None


def test_zero_default_retention_means_never_expires(store: Store) -> None:
    backend = store.make(default_retention_days=0)
    backend.set(RUN, "cursor", "1")
    row = store.row(RUN, "cursor")
    assert row is not None and row.expires_at is None
    assert backend.get(RUN, "cursor") == "1"


def test_per_key_retention_overrides_the_default(store: Store) -> None:
    backend = store.make(default_retention_days=30)
    t0 = store.now()
    backend.set(RUN, "short", "s", retention=dt.timedelta(hours=2))
    backend.set(RUN, "forever", "f", retention=NEVER)
    backend.set(RUN, "default", "d")
    t1 = store.now()
    short, forever, default = (store.row(RUN, k) for k in ("short", "forever", "default"))
    assert short is not None and forever is not None and default is not None
    assert within(short.expires_at, t0 + dt.timedelta(hours=2), t1 + dt.timedelta(hours=2))
    assert forever.expires_at is None
    assert within(default.expires_at, t0 + dt.timedelta(days=30), t1 + dt.timedelta(days=30))
    assert [backend.get(RUN, k) for k in ("short", "forever", "default")] == ["s", "f", "d"]


def test_expired_rows_are_invisible_before_cleanup(store: Store) -> None:
    backend = store.make()
    backend.set(RUN, "blink", "b", retention=dt.timedelta(milliseconds=20))
    backend.set(RUN, "zero", "z", retention=dt.timedelta(0))
    backend.set(RUN, "stale", "s")
    # A row Airflow wrote long ago: its expires_at is in the past.
    t = store.tables.task_state
    with store.engine.begin() as conn:
        conn.execute(update(t).where(t.c.key == "stale")
                     .values(expires_at=store.now() - dt.timedelta(days=1)))
    deadline = store.now() + dt.timedelta(milliseconds=50)
    while store.now() <= deadline:
        time.sleep(0.01)
    assert [backend.get(RUN, k) for k in ("blink", "zero", "stale")] == [None, None, None]
    assert store.count() == 3  # still stored; only the cleanup removes rows


def test_upsert_refreshes_value_and_expiry_and_keeps_the_id(store: Store) -> None:
    backend = store.make()
    backend.set(RUN, "cursor", "old", retention=dt.timedelta(milliseconds=1))
    first = store.row(RUN, "cursor")
    time.sleep(0.02)
    assert backend.get(RUN, "cursor") is None  # expired
    t0 = store.now()
    backend.set(RUN, "cursor", "new", retention=dt.timedelta(hours=1))
    t1 = store.now()
    second = store.row(RUN, "cursor")
    assert first is not None and second is not None
    assert second.id == first.id
    assert second.value == "new"
    assert within(second.expires_at, t0 + dt.timedelta(hours=1), t1 + dt.timedelta(hours=1))
    assert within(second.updated_at, t0, t1)
    assert backend.get(RUN, "cursor") == "new"  # refreshed: visible again
    backend.set(RUN, "cursor", "kept", retention=NEVER)
    third = store.row(RUN, "cursor")
    assert third is not None and (third.id, third.expires_at) == (first.id, None)
    assert store.count() == 1


def test_map_indices_are_separate_rows(store: Store) -> None:
    backend = store.make()
    mapped = [TaskScope("etl", "run_1", "extract", map_index=i) for i in (-1, 0, 1)]
    for scope in mapped:
        backend.set(scope, "k", f"v{scope.map_index}")
    assert [backend.get(s, "k") for s in mapped] == ["v-1", "v0", "v1"]
    assert store.count() == 3


def test_regions_are_separate_rows_on_3_4_and_refused_on_3_3(store: Store) -> None:
    """3.4 keys state by region too: the same task, map index and key in two regions are two
    rows, and the legacy region is the all-zero UUID Airflow migrated 3.3's rows into. 3.3 has
    no region column, so a region there is refused, not silently merged into one row."""
    backend = store.make()
    region = uuid.UUID("0b7c3a4e-9d21-4c55-8f0e-3f4a5b6c7d8e")
    regional = TaskScope("etl", "run_1", "extract", map_index=2, region_id=region)
    legacy = TaskScope("etl", "run_1", "extract", map_index=2)
    if store.tables.layout == "3.3":
        with pytest.raises(InvalidArgument, match="region_id .* needs Airflow 3.4"):
            backend.set(regional, "k", "v")
        assert store.count() == 0
        # The legacy region is 3.3's only one: naming it explicitly is the same row.
        backend.set(TaskScope("etl", "run_1", "extract", 2, LEGACY_REGION), "k", "v")
        assert backend.get(legacy, "k") == "v"
        return
    backend.set(regional, "k", "in region")
    backend.set(legacy, "k", "legacy")
    assert (backend.get(regional, "k"), backend.get(legacy, "k")) == ("in region", "legacy")
    assert regional.region_index == 2
    t = store.tables.task_state
    with store.engine.connect() as conn:
        stored = {r[0]: r[1] for r in conn.execute(select(t.c.value, t.c.region_id))}
    assert stored == {"in region": region, "legacy": LEGACY_REGION}
    backend.clear(regional)
    assert (backend.get(regional, "k"), backend.get(legacy, "k")) == (None, "legacy")


def test_delete_removes_one_key(store: Store) -> None:
    backend = store.make()
    for scope in (RUN, OTHER_TASK, OTHER_RUN):
        backend.set(scope, "a", "1")
        backend.set(scope, "b", "2")
    backend.delete(RUN, "a")
    backend.delete(RUN, "never-set")  # nothing to delete is not an error
    assert backend.get(RUN, "a") is None
    assert backend.get(RUN, "b") == "2"
    assert backend.get(OTHER_TASK, "a") == backend.get(OTHER_RUN, "a") == "1"
    assert store.count() == 5


def test_clear_one_map_index_or_all(store: Store) -> None:
    backend = store.make()
    mapped = [TaskScope("etl", "run_1", "extract", map_index=i) for i in (-1, 0, 1)]
    for all_map_indices in (False, True):
        for scope in (*mapped, OTHER_TASK, OTHER_RUN):
            backend.set(scope, "a", "1")
            backend.set(scope, "b", "2")
        assert store.count() == 10
        backend.clear(mapped[1], all_map_indices=all_map_indices)
        cleared = mapped if all_map_indices else [mapped[1]]
        for scope in (*mapped, OTHER_TASK, OTHER_RUN):
            expect = None if scope in cleared else "2"
            assert backend.get(scope, "b") == expect, (all_map_indices, scope)
        assert store.count() == 10 - 2 * len(cleared)


def test_asset_state_by_id_and_by_name_and_uri(store: Store) -> None:
    backend = store.make()
    by_id = AssetScope(asset_id=ASSET_ID)
    backend.set(ASSET, "watermark", "w1")
    backend.set(by_id, "watermark", "w2")  # the same row, upserted
    backend.set(by_id, "other", "o")
    backend.set(AssetScope(asset_id=2), "watermark", "u")
    assert backend.get(ASSET, "watermark") == backend.get(by_id, "watermark") == "w2"
    assert store.count("asset_state") == 3
    backend.delete(ASSET, "watermark")
    assert backend.get(by_id, "watermark") is None
    assert backend.get(by_id, "other") == "o"
    backend.clear(by_id)
    assert backend.get(ASSET, "other") is None
    assert backend.get(AssetScope(asset_id=2), "watermark") == "u"
    backend.set(AssetScope(asset_id=2), "k", "v")
    backend.clear(AssetScope(name="users", uri="s3://lake/users"))
    assert store.count("asset_state") == 0
    assert store.count() == 0  # asset state never lands in task state


def test_missing_dag_run_or_asset_is_not_found(store: Store) -> None:
    backend = store.make()
    with pytest.raises(NotFound, match="dag run 'etl'/'nope' does not exist"):
        backend.set(TaskScope("etl", "nope", "extract"), "k", "v")
    with pytest.raises(NotFound, match="'ghost'/'run_1'"):
        backend.get(TaskScope("ghost", "run_1", "extract"), "k")
    with pytest.raises(NotFound, match="asset with id 99 does not exist"):
        backend.set(AssetScope(asset_id=99), "k", "v")
    with pytest.raises(NotFound, match="name 'orders' uri 's3://elsewhere'"):
        backend.get(AssetScope(name="orders", uri="s3://elsewhere"), "k")
    assert store.count() == store.count("asset_state") == 0


BAD_RETENTIONS: list[tuple[object, str]] = [
    (dt.timedelta(seconds=-1), "must not be negative"),
    (dt.timedelta(days=-30), "must not be negative"),
    (30, "must be a timedelta, NEVER or None"),
    ("30d", "must be a timedelta, NEVER or None"),
]


def test_bad_retention_is_rejected_and_nothing_written(store: Store) -> None:
    backend = store.make()
    for retention, needle in BAD_RETENTIONS:
        with pytest.raises(InvalidArgument, match=needle) as err:
            backend.set(RUN, "k", "v", retention=retention)  # type: ignore[arg-type]
        assert repr(retention) in str(err.value)
    assert store.count() == 0


def test_asset_state_with_retention_is_rejected(store: Store) -> None:
    backend = store.make()
    for retention in (dt.timedelta(days=1), dt.timedelta(0), NEVER):
        with pytest.raises(InvalidArgument, match="asset state has no expiry"):
            backend.set(ASSET, "k", "v", retention=retention)
    assert store.count("asset_state") == 0


def test_bad_scope_and_value_are_rejected(store: Store) -> None:
    backend = store.make()
    with pytest.raises(InvalidArgument, match="needs asset_id, or both name and uri"):
        AssetScope(name="orders")
    with pytest.raises(InvalidArgument, match="value must be a str, got int"):
        backend.set(RUN, "k", 5)  # type: ignore[arg-type]
    assert store.count() == 0


def test_base_backend_cleanup_is_a_no_op(store: Store, make_settings: Callable[..., Settings]
                                         ) -> None:
    backend = store.make()
    backend.set(RUN, "old", "v", retention=dt.timedelta(0))
    base = BaseStateBackend(make_settings(), store.engine, store.tables)
    base.cleanup()
    assert store.count() == 1  # the expired row is still there: the base deletes nothing
    with pytest.raises(NotImplementedError):
        base.get(RUN, "old")
    settings = make_settings(state_backend="workers.store.BaseStateBackend")
    loaded = load_backend(settings, store.engine, store.tables)
    assert type(loaded) is BaseStateBackend
    loaded.cleanup()
    assert store.count() == 1
    with pytest.raises(InvalidArgument, match="needs an engine and its tables"):
        MetastoreStateBackend(make_settings())
