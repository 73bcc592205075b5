"""Selection, as `airflow db clean` spells it, on each dialect: --dag-ids and --exclude-dag-ids
narrow what every chunk's DELETE may touch, --clean-before-timestamp moves the cutoff back
(never forward), and bad values are refused before anything is deleted."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, select

from tests.cleanup_runs import memory_store
from tests.conftest import create_schema, database_now
from workers.chunk import run_local
from workers.exceptions import InvalidArgument
from workers.schema import Tables
from workers.seed import SeedSpec, seed
from workers.selection import Selection
from workers.settings import Settings

pytestmark = pytest.mark.integration


@dataclasses.dataclass
class Db:
    engine: Engine
    tables: Tables
    settings: Settings

    def expired(self, at: dt.datetime | None = None) -> dict[str, int]:
        """Expired rows (at *at*, default now) per dag id."""
        t = self.tables.task_state
        at = at or database_now(self.engine)
        out: dict[str, int] = {}
        with self.engine.connect() as conn:
            for (dag_id,) in conn.execute(select(t.c.dag_id).where(t.c.expires_at < at)):
                out[dag_id] = out.get(dag_id, 0) + 1
        return out

    def run(self, selection: Selection) -> int:
        store = memory_store()
        summary = run_local(self.settings, self.engine, self.tables, store, selection=selection)
        record = store.get(summary.run_id)
        assert record is not None and record.state == "finished", record
        assert Selection.decode(record.selection) == selection
        return record.rows_deleted


@pytest.fixture
def db(db_url: str, make_settings: Callable[..., Settings]) -> Iterator[Db]:
    engine, tables = create_schema(db_url)
    seed(engine, tables, SeedSpec(rows=3000, assets=3), database_now(engine))
    yield Db(engine, tables, make_settings(database_url=db_url, run_store_url="memory://",
                                           cleanup_batch_size=50))
    engine.dispose()


def test_dag_ids_and_exclusions_narrow_every_delete(db: Db) -> None:
    before = db.expired()
    assert db.run(Selection.from_args(dag_ids="dag_1,dag_2")) == before["dag_1"] + before["dag_2"]
    after = db.expired()
    assert "dag_1" not in after and "dag_2" not in after
    assert after == {d: n for d, n in before.items() if d not in ("dag_1", "dag_2")}
    kept = ["dag_3", "dag_4"]
    assert db.run(Selection.from_args(exclude_dag_ids=kept)) == sum(
        n for d, n in after.items() if d not in kept)
    assert db.expired() == {d: before[d] for d in kept}


def test_clean_before_timestamp_is_a_grace_period_never_a_later_cutoff(db: Db) -> None:
    now = database_now(db.engine)
    grace = now - dt.timedelta(minutes=500)  # the seed expires rows 1..1000 minutes ago
    older = sum(db.expired(grace).values())
    assert 0 < older < sum(db.expired().values())
    assert db.run(Selection.from_args(clean_before_timestamp=grace.isoformat())) == older
    assert db.expired(grace) == {}
    # A timestamp in the future is the database's now: nothing unexpired is touched.
    later = now + dt.timedelta(days=365)
    remaining = sum(db.expired().values())
    assert db.run(Selection.from_args(clean_before_timestamp=later.isoformat())) == remaining
    assert db.expired() == {}


@pytest.mark.parametrize(("args", "needle"), [
    ({"dag_ids": 5}, "dag_ids must be comma-separated dag ids"),
    ({"dag_ids": "a,,b"}, "dag_ids must name dag ids"),
    ({"exclude_dag_ids": ["x" * 300]}, "exclude_dag_ids must name dag ids of at most 250"),
    ({"clean_before_timestamp": "last tuesday"}, "clean_before_timestamp is not an ISO-8601"),
    ({"clean_before_timestamp": 1700000000}, "clean_before_timestamp must be an ISO-8601"),
])
def test_bad_selections_name_the_argument(args: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        Selection.from_args(**args)
