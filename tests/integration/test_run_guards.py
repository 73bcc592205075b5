"""What the run store refuses, with rows on the line (issue 15 items 2 and 6): a reused run id, and
chunk messages that do not match the plan. Each on a real Redis and on memory://, against SQLite
rows (the guard is the run store's; the DELETE it protects is the same on every dialect)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine

from tests.cleanup_runs import Outbox, add_dag_run, add_rows, deliver, surviving_ids
from tests.conftest import create_schema, database_now
from workers import chunk, cleanup, control, coordinator
from workers.exceptions import InvalidArgument, NotFound
from workers.runs import Gate, RunStore
from workers.schema import Tables
from workers.settings import Settings
from workers.window import Sender

pytestmark = pytest.mark.integration


@dataclass
class Run:
    settings: Settings
    engine: Engine
    tables: Tables
    store: RunStore
    live: set[int]
    expired: set[int]

    def coordinate(self, outbox: Outbox, **kw: object) -> coordinator.RunSummary:
        return coordinator.coordinate(self.settings, self.engine, self.tables, self.store,
                                      outbox, **kw)  # type: ignore[arg-type]

    def send(self, run_id: str, number: int, kind: str, lo: int, hi: int | None,
             cutoff: str) -> chunk.ChunkResult:
        args = chunk.check_chunk_args(run_id, number, kind, lo, hi, cutoff)
        return chunk.run_chunk(self.settings, self.engine, self.tables, self.store, Outbox(),
                               args)


@pytest.fixture
def run(sqlite_url: str, store: RunStore, make_settings: Callable[..., Settings]) -> Iterator[Run]:
    engine, tables = create_schema(sqlite_url)
    add_dag_run(engine, tables)
    now = database_now(engine)
    old, new = now - dt.timedelta(hours=1), now + dt.timedelta(days=1)
    ids = add_rows(engine, tables, [old if i % 3 else new for i in range(30)])
    expired = {i for n, i in enumerate(ids) if n % 3}
    # 20 expired rows, ten a chunk, one chunk in flight at a time: a two-chunk run.
    settings = make_settings(database_url=sqlite_url, run_store_url="memory://",
                             cleanup_batch_size=10, planner="walk", max_chunks_in_flight=1)
    yield Run(settings, engine, tables, store, set(ids) - expired, expired)
    engine.dispose()


def test_defect_reused_run_id_is_refused_not_wedged(run: Run) -> None:
    """Issue 15 item 2: a second trigger with a finished run's id is refused, clearly; it neither
    takes nor keeps the lock, and the finished run's record is left as it was."""
    outbox = Outbox()
    first = run.coordinate(outbox, run_id="nightly", source="test")
    deliver(run.settings, run.engine, run.tables, run.store, outbox)
    done = run.store.get("nightly")
    assert first.status == "started" and done is not None and done.state == "finished"
    assert surviving_ids(run.engine, run.tables) == run.live

    add_rows(run.engine, run.tables, [dt.datetime(2000, 1, 1, tzinfo=dt.UTC)] * 3, tag="late")
    with pytest.raises(InvalidArgument, match=r"run id 'nightly' .*already ended \(finished\)"):
        run.coordinate(Outbox(), run_id="nightly", source="test")
    assert run.store.active_run() is None
    assert run.store.get("nightly") == done
    # The next trigger with a fresh id runs normally.
    outbox = Outbox()
    run.coordinate(outbox, source="test")
    deliver(run.settings, run.engine, run.tables, run.store, outbox)
    assert surviving_ids(run.engine, run.tables) == run.live


def test_defect_chunk_messages_are_checked_against_the_plan(run: Run) -> None:
    """Issue 15 item 6: chunk numbers never planned, bounds not planned, a kind not planned and
    run ids that could address other keys are all refused; nothing is deleted, nothing is
    counted, and the run does not finish early."""
    outbox = Outbox()
    summary = run.coordinate(outbox, source="test")
    [first] = outbox.take()
    assert (first.number, summary.status) == (1, "started")
    rid, cut, lo, hi = summary.run_id, summary.cutoff, first.range.lo, first.range.hi
    before = surviving_ids(run.engine, run.tables)

    forged = [(2, "walk", lo, hi), (3, "walk", 100, 200), (99, "walk", lo, hi),  # never planned
              (1, "walk", 0, 10**12), (1, "walk", lo, (hi or 0) + 1),  # not the planned bounds
              (1, "ids", lo, hi)]  # the planned bounds under another range kind
    for number, kind, flo, fhi in forged:
        with pytest.raises(InvalidArgument, match="not in run .* plan.*nothing deleted"):
            run.send(rid, number, kind, flo, fhi, cut)
    for bad_id in (f"{rid}:inflight", f"{rid}:chunks", "x:y"):
        with pytest.raises(InvalidArgument, match="run_id"):
            run.send(bad_id, 1, "walk", lo, hi, cut)
    with pytest.raises(NotFound, match="unknown run id"):
        run.send("another-run", 1, "walk", lo, hi, cut)

    assert surviving_ids(run.engine, run.tables) == before
    record = run.store.get(rid)
    assert record is not None
    assert (record.state, record.chunks_done, record.rows_deleted) == ("running", 0, 0)
    assert run.store.active_run() == rid and [n for n, *_ in run.store.inflight(rid)] == [1]

    # The real messages still run the whole plan.
    outbox.queue.append(first)
    deliver(run.settings, run.engine, run.tables, run.store, outbox)
    record = run.store.get(rid)
    assert record is not None and (record.state, record.chunks_planned, record.chunks_done,
                                   record.rows_deleted) == ("finished", 2, 2, len(run.expired))
    assert surviving_ids(run.engine, run.tables) == run.live


def test_chunk_of_a_foreign_cutoff_deletes_nothing(run: Run) -> None:
    outbox = Outbox()
    summary = run.coordinate(outbox, source="test")
    [first] = outbox.take()
    r = first.range
    with pytest.raises(InvalidArgument, match="is not run"):
        run.send(summary.run_id, 1, r.kind, r.lo, r.hi, "2001-01-01T00:00:00+00:00")
    assert surviving_ids(run.engine, run.tables) == run.live | run.expired


def test_chunks_of_an_aborted_run_delete_nothing(run: Run) -> None:
    outbox = Outbox()
    summary = run.coordinate(outbox, source="test")
    control.abort(run.store, summary.run_id, by="ops")
    results = deliver(run.settings, run.engine, run.tables, run.store, outbox)
    assert [(r.status, r.rows, r.counted) for r in results] == [("ended", 0, False)]
    assert surviving_ids(run.engine, run.tables) == run.live | run.expired
    assert run.store.active_run() is None
    # The next run takes what the aborted one left.
    outbox = Outbox()
    run.coordinate(outbox, source="test")
    deliver(run.settings, run.engine, run.tables, run.store, outbox)
    assert surviving_ids(run.engine, run.tables) == run.live


def test_walk_cuts_by_racing_finishers_never_overfill_the_window(run: Run) -> None:
    """Two chunks finish at once: each FINISH hands its process the room it saw, and both cut
    walk chunks afterwards; together they must not put more than the window in flight."""
    settings = dataclasses.replace(run.settings, cleanup_batch_size=3, max_chunks_in_flight=2)
    outbox = Outbox()
    summary = coordinator.coordinate(settings, run.engine, run.tables, run.store, outbox)
    first, second = outbox.take()
    rooms = []
    for m in (first, second):  # both deleted and counted before either process cuts
        rows = cleanup.delete_range(run.engine, run.tables, m.range, m.args().cutoff)
        _, window = run.store.finish_chunk(
            summary.run_id, m.number, "walk", rows, 0, lock_ttl=3600, window=2,
            resend_after=3600.0, gate=Gate())
        rooms.append(window.cut_room)
    assert rooms == [1, 2]
    sender = Sender(settings, run.engine, run.tables, run.store, outbox)
    for room in rooms:
        sender.cut_more(summary.run_id, summary.cutoff, room)
    assert len(run.store.inflight(summary.run_id)) <= 2
    deliver(settings, run.engine, run.tables, run.store, outbox)
    record = run.store.get(summary.run_id)
    assert record is not None and record.state == "finished"
    assert surviving_ids(run.engine, run.tables) == run.live
