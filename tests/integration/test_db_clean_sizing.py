"""db-clean's chunks sized by time on real PostgreSQL and MariaDB: the sizes follow the times a
test chose for each table's transactions (never the wall clock), a slow table's chunks shrink,
a fast one's stay at --batch-size, none passes it, and the rows left are Airflow's."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, func, select
from structlog.testing import capture_logs

from tests.integration.test_db_clean import (  # noqa: F401 - one_db is a fixture
    Data,
    T,
    expected,
    keys,
    old_dag_runs,
    one_db,
)
from tests.services import unique
from workers.dbclean import distributed
from workers.dbclean import run as dbclean
from workers.runs import registry_for
from workers.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@dataclass
class InjectedTimes(dbclean.Sizes):
    """The run's own Sizes, but each transaction took what the test says per row of its table."""

    ms_per_row: dict[str, float] = field(default_factory=dict)

    def note(self, table: str, timing: dbclean.Timing, evidence: bool | None = None) -> None:
        ms = self.ms_per_row.get(table, 0.001) * max(1, timing.rows)
        super().note(table, dataclasses.replace(timing, seconds=ms / 1000), evidence)


def test_a_slow_tables_transactions_shrink_and_none_passes_the_batch_size(
        one_db: tuple[str, Engine, Data]) -> None:  # noqa: F811 - the fixture
    """task_instance's rows take 50 ms each (its per-row cascade triggers, made slow), log's
    1 us: with --batch-size 160 and a 200 ms target, each table's chunk is moved in slices that
    start at a twentieth (8 rows); task_instance's go 4, then about 2, log's grow; none passes
    160;
    the rows left are those the rules leave."""
    _, engine, data = one_db
    sizes = InjectedTimes(160, 200, ms_per_row={"task_instance": 50.0, "log": 0.001})
    request = dbclean.Request(before=T, tables=("task_instance", "log"), batch_size=160,
                              skip_archive=True)
    with capture_logs() as logs:
        report = dbclean.clean(engine, request, sizes=sizes)
    slices = [e for e in logs if e["event"] == "db_clean_slice_moved"]
    ti = [e["size"] for e in slices if e["table"] == "task_instance"]
    assert len(ti) >= 3 and ti[0] == 8
    # Halved at once after 400 ms, then where 50 ms a row fits in 100 ms (half the target).
    assert ti[1] == 4 and max(ti[2:]) <= 2
    lg = [e["size"] for e in slices if e["table"] == "log"]
    assert lg[0] == 8 and lg == sorted(lg) and lg[-1] > 8
    sized = slices + [e for e in logs if e["event"] == "db_clean_dependants_deleted"]
    assert all(0 < e["size"] <= 160 and e["rows"] <= e["size"] for e in sized)
    chunks = [e for e in logs if e["event"] == "db_clean_chunk_moved"]
    assert all(e["rows"] <= 160 for e in chunks)
    [ti_result] = [r for r in report.tables if r.table == "task_instance"]
    assert ti_result.longest_transaction_ms == 400.0  # 8 rows at 50 ms, as injected
    # Only task_instance's own rule ran (no dag_run cascade): the ones that started before T go.
    assert keys(engine, "task_instance") == {
        r["id"] for r in data.tis if r["start_date"] is None or r["start_date"] >= T}
    assert keys(engine, "log") == expected(data)["log"]


def test_a_slow_dependants_batches_shrink_by_their_own_time(
        one_db: tuple[str, Engine, Data]) -> None:  # noqa: F811 - the fixture
    """An old dag run with 40 task instances that never started (their own rule keeps them):
    cleaning dag_run with --batch-size 160, where each task instance takes 50 ms to delete, its
    dependant batches start at a twentieth (8), halve after 400 ms and then stay where 50 ms a row
    fits in half the 200 ms target; they are timed apart from the dag runs' own slices, and
    every one of the 40 goes before its dag run."""
    _, engine, data = one_db
    md = MetaData()
    md.reflect(engine, only=["dag_run", "task_instance"])
    with engine.begin() as conn:
        old_dag_runs(conn, md, "big", {999: 40})
    key = dbclean.dependant_key("dag_run", "task_instance")
    sizes = InjectedTimes(160, 200, ms_per_row={key: 50.0})
    request = dbclean.Request(before=T, tables=("dag_run",), batch_size=160, skip_archive=True)
    with capture_logs() as logs:
        dbclean.clean(engine, request, sizes=sizes)
    ti = [e for e in logs if e["event"] == "db_clean_dependants_deleted"
          and e["dependant"] == "task_instance"]
    assert [e["size"] for e in ti[:2]] == [8, 4] and max(e["size"] for e in ti[2:]) <= 2
    assert all(0 < e["rows"] <= e["size"] for e in ti)
    assert sum(e["rows"] for e in ti) >= 40
    assert sizes.longest_ms[key] == 400.0  # 8 rows at 50 ms, as injected
    # The dag runs' own slices are sized from their own (fast) times: not shrunk with them.
    runs = [e["size"] for e in logs if e["event"] == "db_clean_slice_moved"
            and e["table"] == "dag_run"]
    assert runs and runs[0] == 8 and runs == sorted(runs)
    assert keys(engine, "dag_run") == expected(data)["dag_run"]
    with engine.connect() as conn:
        t = md.tables["task_instance"]
        assert conn.execute(select(func.count()).select_from(t)
                            .where(t.c.dag_id == "big")).scalar_one() == 0


def _context(settings: Settings, engine: Engine,
             sent: list[tuple[Any, ...]]) -> distributed.Context:
    registry = registry_for("memory://", settings.key_prefix)

    def send(run_id: str, chunk: int, table: str, lo: str | None, hi: str | None) -> None:
        sent.append((run_id, chunk, table, lo, hi))

    return distributed.Context(settings, engine, registry, send)


@dataclass
class InjectedStoreTimes(distributed.StoreSizes):
    """The workers' run-store sizes, each transaction taking what the test says per row."""

    ms_per_row: float = 50.0

    def note(self, table: str, timing: dbclean.Timing, evidence: bool | None = None) -> None:
        ms = self.ms_per_row * max(1, timing.rows)
        super().note(table, dataclasses.replace(timing, seconds=ms / 1000), evidence)


def test_on_the_workers_a_slow_tables_chunk_moves_in_shrinking_transactions(
        one_db: tuple[str, Engine, Data],  # noqa: F811 - the fixture
        make_settings: Callable[..., Settings]) -> None:
    """A chunk of log (--batch-size 160: all 20 eligible rows) whose rows take 50 ms each is
    moved in transactions of 8, 4, then about 2 rows, sized through the run store (where every
    worker reads them); the chunk is cut, sent and counted once, the rows left are Airflow's,
    and the table's longest transaction shows in the run's report."""
    url, engine, data = one_db
    settings = make_settings(database_url=url, run_store_url="memory://",
                             key_prefix=f"sw:{unique('t')}")
    sent: list[tuple[Any, ...]] = []
    ctx = _context(settings, engine, sent)
    ctx.sizer = lambda store, run_id, request: InjectedStoreTimes(
        store, run_id, request.batch_size, request.target_ms)
    run_id = f"dbclean-{uuid.uuid4().hex[:12]}"
    request = dbclean.Request(before=T, tables=("log",), batch_size=160, skip_archive=True)
    distributed.start(ctx, run_id, request, "test")
    assert [(s[3], s[4]) for s in sent] == [(None, None)]  # 20 rows: one chunk
    _, chunk, table, lo, hi = sent.pop()
    with capture_logs() as logs:
        assert distributed.run_chunk(ctx, run_id, chunk, table, lo, hi).status == "moved"
    sizes = [e["size"] for e in logs if e["event"] == "db_clean_slice_moved"]
    assert sizes[:2] == [8, 4] and max(sizes[2:]) <= 2
    [moved] = [e for e in logs if e["event"] == "db_clean_chunk_moved"]
    assert moved["rows"] == 20 and moved["transactions"] == len(sizes)
    record = ctx.registry.get(run_id)
    assert record is not None and record.state == "finished" and not sent
    [log_table] = ctx.store.tables(run_id)
    assert log_table["deleted"] == 20 and log_table["chunks"] == 1
    assert log_table["longest_transaction_ms"] == 400.0
    assert log_table["transactions"] == len(sizes)
    assert keys(engine, "log") == expected(data)["log"]


@pytest.mark.parametrize("counted", [20, 1], ids=["count-right", "count-stale"])
def test_on_the_workers_a_tables_chunks_are_cut_even(
        one_db: tuple[str, Engine, Data],  # noqa: F811 - the fixture
        make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch,
        counted: int) -> None:
    """log's 20 eligible rows at --batch-size 15 are cut into two chunks of 10 (not 15 and 5),
    so two workers finish the table together; the rows left are Airflow's. A count that fell
    behind the table (1, rows having become eligible since) does not make its last chunk take
    them all: they are cut at --batch-size, 15 and 5."""
    url, engine, data = one_db
    monkeypatch.setattr(distributed, "_count", lambda *a: counted)
    settings = make_settings(database_url=url, run_store_url="memory://",
                             key_prefix=f"sw:{unique('t')}")
    sent: list[tuple[Any, ...]] = []
    ctx = _context(settings, engine, sent)
    run_id = f"dbclean-{uuid.uuid4().hex[:12]}"
    request = dbclean.Request(before=T, tables=("log",), batch_size=15, skip_archive=True)
    distributed.start(ctx, run_id, request, "test")
    assert len(sent) == 2 and sent[-1][4] is None  # the last chunk is open-ended
    with capture_logs() as logs:
        for _, chunk, table, lo, hi in list(sent):
            assert distributed.run_chunk(ctx, run_id, chunk, table, lo, hi).status == "moved"
    assert [e["rows"] for e in logs if e["event"] == "db_clean_chunk_moved"] == \
        ([10, 10] if counted == 20 else [15, 5])
    assert keys(engine, "log") == expected(data)["log"]
