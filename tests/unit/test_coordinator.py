"""The cleanup run as plain functions: coordinate(), run_chunk() and run_local(), on SQLite (no
service) with the memory:// run store (fakeredis running the same Lua as Redis) and a dispatch
that collects chunk messages. The same functions run under real workers in tests/acceptance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from sqlalchemy import Engine
from structlog.testing import capture_logs

from tests.cleanup_runs import Outbox, deliver, memory_store
from tests.conftest import create_schema, database_now
from workers import chunk, control, coordinator
from workers.exceptions import InvalidArgument
from workers.runs import RunStore
from workers.schema import Tables
from workers.seed import SeedSpec, asset_state_rows, expected_survivors, seed, task_state_rows
from workers.settings import Settings
from workers.store import BaseStateBackend

SPEC = SeedSpec(rows=2000, assets=30)
EXPIRED = 1100  # 11 of every 20 rows
BATCH = 100
WINDOW = 3


@dataclass
class Db:
    engine: Engine
    tables: Tables
    settings: Settings
    store: RunStore

    def coordinate(self, outbox: Outbox | None = None, **kw: Any) -> coordinator.RunSummary:
        return coordinator.coordinate(self.settings, self.engine, self.tables, self.store,
                                      outbox if outbox is not None else Outbox(), **kw)

    def deliver(self, outbox: Outbox) -> list[chunk.ChunkResult]:
        return deliver(self.settings, self.engine, self.tables, self.store, outbox)


@pytest.fixture
def db(sqlite_url: str, make_settings: Callable[..., Settings]) -> Iterator[Db]:
    engine, tables = create_schema(sqlite_url, "seed")
    seed(engine, tables, SPEC, database_now(engine))
    settings = make_settings(database_url=sqlite_url, run_store_url="memory://",
                             cleanup_batch_size=BATCH, max_chunks_in_flight=WINDOW)
    yield Db(engine, tables, settings, memory_store())
    engine.dispose()


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# --- a whole run --------------------------------------------------------------------------------


def test_run_local_deletes_exactly_the_expired_rows_and_logs_each_chunk(db: Db) -> None:
    before_assets = asset_state_rows(db.engine, db.tables)
    with capture_logs() as logs:
        summary = chunk.run_local(db.settings, db.engine, db.tables, db.store)
    assert task_state_rows(db.engine, db.tables) == expected_survivors(SPEC)
    assert asset_state_rows(db.engine, db.tables) == before_assets  # retention never touches it
    record = db.store.get(summary.run_id)
    assert record is not None and (record.state, record.rows_deleted) == ("finished", EXPIRED)
    deleted = events(logs, "chunk_deleted")
    assert len(deleted) == record.chunks_done == record.chunks_planned > WINDOW
    assert all(e["run_id"] == summary.run_id and e["counted"] and e["kind"] == "ids"
               for e in deleted)
    assert sum(e["rows"] for e in deleted) == EXPIRED
    [finished] = events(logs, "cleanup_run_finished")
    assert (finished["rows"], finished["chunks"]) == (EXPIRED, record.chunks_done)
    [started] = events(logs, "cleanup_run_started")
    assert (started["cutoff"], started["planner"]) == (summary.cutoff, "ids")
    assert started["reason"].startswith("auto: backlog: ")
    assert db.store.active_run() is None


def test_coordinator_sends_one_window_and_keeps_the_lock(db: Db) -> None:
    outbox = Outbox()
    summary = db.coordinate(outbox, source="test")
    assert (summary.status, summary.chunks) == ("started", WINDOW)
    assert [m.number for m in outbox.sent] == [1, 2, 3]
    assert {m.cutoff for m in outbox.sent} == {summary.cutoff}
    record = db.store.get(summary.run_id)
    assert record is not None and (record.state, record.source) == ("running", "test")
    assert db.store.active_run() == summary.run_id


def test_nothing_expired_finishes_the_run_at_once(db: Db) -> None:
    chunk.run_local(db.settings, db.engine, db.tables, db.store)
    outbox = Outbox()
    with capture_logs() as logs:
        summary = db.coordinate(outbox)
    assert (summary.status, summary.chunks, outbox.sent) == ("finished", 0, [])
    assert len(events(logs, "cleanup_run_finished")) == 1
    assert db.store.active_run() is None


@pytest.mark.parametrize("bad", [-1, "10", 2.5, True])
def test_bad_batch_size_fails_before_anything_happens(db: Db, bad: Any) -> None:
    outbox = Outbox()
    with pytest.raises(InvalidArgument, match="batch_size"):
        db.coordinate(outbox, batch_size=bad)
    assert outbox.sent == [] and db.store.recent() == [] and db.store.active_run() is None


# --- triggers while a run is active, held or redelivered -----------------------------------------


def test_trigger_while_a_run_is_active_tops_it_up_and_names_the_run(db: Db) -> None:
    outbox = Outbox()
    first = db.coordinate(outbox)
    with capture_logs() as logs:
        second = db.coordinate(outbox, source="adhoc")
    # Nothing lost or parked, the window is full: a trigger sends nothing and says why.
    assert (second.status, second.active_run_id, second.chunks) == ("skipped", first.run_id, 0)
    assert len(outbox.sent) == WINDOW and events(logs, "cleanup_run_started") == []
    [skip] = events(logs, "coordinator_skipped_active_run")
    assert (skip["active_run_id"], skip["run_id"]) == (first.run_id, second.run_id)

    # A chunk parked while paused goes out again with the next trigger after resume.
    control.pause(db.store, by="ops")
    parked = outbox.queue.popleft()
    assert chunk.run_chunk(db.settings, db.engine, db.tables, db.store, outbox,
                           parked.args()).status == "held"
    control.resume(db.store, by="ops")
    resumed = db.coordinate(outbox)
    assert (resumed.status, resumed.active_run_id, resumed.chunks) == ("resumed", first.run_id, 1)
    assert outbox.sent[-1] == parked
    db.deliver(outbox)
    assert task_state_rows(db.engine, db.tables) == expected_survivors(SPEC)
    assert db.store.active_run() is None and db.coordinate().status == "finished"


def test_paused_trigger_plans_nothing(db: Db) -> None:
    control.pause(db.store, by="ops", reason="incident")
    outbox = Outbox()
    summary = db.coordinate(outbox)
    assert summary.status == "paused" and "paused by ops" in summary.reason
    assert "incident" in summary.reason
    assert outbox.sent == [] and db.store.active_run() is None
    assert db.store.get(summary.run_id) is None
    assert db.store.triggers()["paused"][1] == summary.run_id


def test_trigger_outside_active_hours_plans_nothing(db: Db) -> None:
    pytest.importorskip("workers.flow.hours", reason="active hours live on branch flowparts")
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    closed = f"{(now + dt.timedelta(hours=2)):%H}:00-{(now + dt.timedelta(hours=3)):%H}:00"
    settings = dataclasses.replace(db.settings, active_hours=closed)
    outbox = Outbox()
    summary = coordinator.coordinate(settings, db.engine, db.tables, db.store, outbox)
    assert summary.status == "outside_active_hours" and closed in summary.reason
    assert outbox.sent == [] and db.store.active_run() is None


def test_a_redelivered_coordinator_resumes_its_run_instead_of_planning_twice(db: Db) -> None:
    outbox = Outbox()
    first = db.coordinate(outbox, run_id="coord-task-1")
    with capture_logs() as logs:
        again = db.coordinate(outbox, run_id="coord-task-1")
    assert (again.status, again.run_id, again.cutoff) == ("resumed", "coord-task-1", first.cutoff)
    assert events(logs, "cleanup_run_started") == []
    record = db.store.get("coord-task-1")
    assert record is not None and record.chunks_planned == WINDOW  # nothing planned twice
    db.deliver(outbox)
    done = db.store.get("coord-task-1")
    assert done is not None and (done.state, done.rows_deleted) == ("finished", EXPIRED)


def test_a_duplicate_delivery_that_loses_the_race_to_start_leaves_the_run_alone(
        db: Db) -> None:
    """Issue 21, reproduction 1: two deliveries of one coordinator message (a broker
    redelivery) both pass the lock (same run id) and both plan; the second's START finds the
    run running. It used to fail that run (and free its lock), leaving every expired row; now
    it reports a duplicate and the run finishes with all its rows."""
    first_outbox = Outbox()
    real_start = db.store.start

    def start_after_the_other_copy(run_id: str, *args: Any, **kwargs: Any) -> Any:
        db.store.start = real_start  # type: ignore[method-assign]
        # The other delivery gets there first and starts the run.
        won = db.coordinate(first_outbox, run_id=run_id)
        assert won.status == "started"
        return real_start(run_id, *args, **kwargs)

    db.store.start = start_after_the_other_copy  # type: ignore[method-assign]
    db.store.enqueue("dup-run", "test")
    with capture_logs() as logs:
        lost = db.coordinate(Outbox(), run_id="dup-run")
    assert (lost.status, lost.active_run_id) == ("skipped", "dup-run")
    assert events(logs, "coordinator_duplicate") and not events(logs, "cleanup_run_failed")
    record = db.store.get("dup-run")
    assert record is not None and record.state == "running"
    assert db.store.active_run() == "dup-run"
    db.deliver(first_outbox)
    done = db.store.get("dup-run")
    assert done is not None and (done.state, done.rows_deleted) == ("finished", EXPIRED)


def test_fail_changes_only_a_run_the_caller_owns(db: Db) -> None:
    """fail() is compare-and-set: a running run fails only for the process that started it
    while its lock names it or has lapsed (never while another run holds it); an ended run
    never changes."""
    outbox = Outbox()
    db.coordinate(outbox, run_id="owned")
    assert db.store.fail("owned", "someone else's error") == "running"
    assert db.store.active_run() == "owned"
    db.store.release("owned")  # its lock lapsed: its own process may still fail it
    assert db.store.fail("owned", "its own error", started=True) == "failed"
    assert db.store.active_run() is None
    assert db.store.fail("owned", "again", started=True) == "failed"
    record = db.store.get("owned")
    assert record is not None and record.error == "its own error"
    # Another run's lock is never freed by it.
    assert db.store.acquire("another", 60) is None
    assert db.store.fail("owned", "late", started=True) == "failed"
    assert db.store.active_run() == "another"


def test_a_coordinator_killed_before_its_plan_was_written_is_redone_by_its_redelivery(
        db: Db) -> None:
    # It took the lock and died before START: the lock names it, no plan was written.
    assert db.store.acquire("coord-task-2", db.settings.lock_ttl_seconds) is None
    other = db.coordinate(Outbox())
    assert (other.status, other.active_run_id) == ("skipped", "coord-task-2")
    outbox = Outbox()
    again = db.coordinate(outbox, run_id="coord-task-2")
    assert again.status == "started" and len(outbox.sent) == WINDOW
    db.deliver(outbox)
    assert task_state_rows(db.engine, db.tables) == expected_survivors(SPEC)
    assert db.store.active_run() is None


def test_a_coordinator_that_died_planning_is_sent_again_and_its_late_copy_does_nothing(
        db: Db) -> None:
    """Its delivery took the lock and claimed the run, then died (its planning heartbeat
    lapsed): the pump gets its arguments back once per period, the resent copy takes the dead
    claim over and runs the run, and the original message, redelivered after the run ended,
    is skipped rather than failing as a reused run id would."""
    request = '{"source": "beat", "batch_size": 100}'
    taken = db.store.take("coord-task-3", db.settings.lock_ttl_seconds, "dead-token",
                          source="beat", request=request)
    assert taken.outcome == "taken"
    assert db.store.replan("coord-task-3") is None  # its planner still beats
    db.store.client.delete(f"{db.store.prefix}:run:coord-task-3:planner")  # ... then died
    assert db.store.replan("coord-task-3") == request
    assert db.store.replan("coord-task-3") is None  # one resend per period
    outbox = Outbox()
    again = db.coordinate(outbox, run_id="coord-task-3", request=request)
    assert again.status == "started"
    assert db.store.claimant("coord-task-3") not in (None, "dead-token")
    db.deliver(outbox)
    record = db.store.get("coord-task-3")
    assert record is not None and record.state == "finished" and record.replans == 1
    assert record.rows_deleted == EXPIRED
    late = db.coordinate(Outbox(), run_id="coord-task-3", request=request)
    assert late.status == "skipped" and "planned again" in late.reason
    with pytest.raises(InvalidArgument, match="already ended"):  # a reused id stays refused
        db.coordinate(Outbox(), run_id=db.coordinate(Outbox()).run_id)


# --- chunks -------------------------------------------------------------------------------------


def test_chunks_run_twice_delete_nothing_more_and_the_run_finishes_once(db: Db) -> None:
    outbox = Outbox()
    summary = db.coordinate(outbox)
    with capture_logs() as logs:
        first = db.deliver(outbox)
        for m in list(outbox.sent):  # every chunk redelivered after it finished
            outbox.queue.append(m)
        again = db.deliver(outbox)
    assert sum(r.rows for r in first) == EXPIRED
    assert {(r.status, r.rows, r.counted) for r in again} == {("ended", 0, False)}
    assert len(events(logs, "cleanup_run_finished")) == 1
    record = db.store.get(summary.run_id)
    assert record is not None and (record.chunks_done, record.rows_deleted) == (
        len(first), EXPIRED)


class FlakyCount(RunStore):
    """Counting fails once, as when Redis drops the connection after the DELETE committed."""

    failed: ClassVar[bool] = False

    def finish_chunk(self, *args: Any, **kwargs: Any) -> Any:
        if not FlakyCount.failed:
            FlakyCount.failed = True
            raise ConnectionError("run store went away")
        return super().finish_chunk(*args, **kwargs)


def test_rows_deleted_but_not_counted_are_carried_into_the_retry(db: Db) -> None:
    FlakyCount.failed = False
    db.store = FlakyCount(db.store.client, db.store.prefix)
    outbox = Outbox()
    summary = db.coordinate(outbox)
    m = outbox.queue.popleft()
    with pytest.raises(chunk.ProgressNotRecorded) as lost:
        chunk.run_chunk(db.settings, db.engine, db.tables, db.store, outbox, m.args())
    assert lost.value.rows > 0
    retried = chunk.run_chunk(db.settings, db.engine, db.tables, db.store, outbox, m.args(),
                              carried_rows=lost.value.rows)
    assert (retried.rows, retried.counted) == (lost.value.rows, True)
    db.deliver(outbox)
    record = db.store.get(summary.run_id)
    assert record is not None and (record.state, record.rows_deleted) == ("finished", EXPIRED)


def test_a_chunk_that_failed_for_good_ends_the_run_failed_and_frees_the_lock(db: Db) -> None:
    outbox = Outbox()
    summary = db.coordinate(outbox, batch_size=0)
    [only] = outbox.take()
    counted, window = db.store.finish_chunk(
        summary.run_id, only.number, only.range.kind, 0, 0, lock_ttl=3600, window=WINDOW,
        resend_after=0, gate=chunk.gate(db.settings), error="chunk 1 failed: boom")
    assert counted and window.finished is not None
    assert (window.finished.state, window.finished.chunks_failed) == ("failed", 1)
    assert db.store.active_run() is None


@pytest.mark.parametrize(("args", "needle"), [
    (("", 1, "ids", 1, 2, "2020-01-01T00:00:00+00:00"), "run_id"),
    (("a:b", 1, "ids", 1, 2, "2020-01-01T00:00:00+00:00"), "run_id"),
    (("r", "1", "ids", 1, 2, "2020-01-01T00:00:00+00:00"), "chunk"),
    (("r", 0, "ids", 1, 2, "2020-01-01T00:00:00+00:00"), "chunk must be at least 1"),
    (("r", 1, "rows", 1, 2, "2020-01-01T00:00:00+00:00"), "kind must be one of"),
    (("r", 1, "ids", 5, 2, "2020-01-01T00:00:00+00:00"), "hi must be above lo"),
    (("r", 1, "ids", -1, 2, "2020-01-01T00:00:00+00:00"), "lo must be at least 0"),
    (("r", 1, "ids", 1, True, "2020-01-01T00:00:00+00:00"), "hi"),
    (("r", 1, "ids", 1, None, "2020-01-01T00:00:00+00:00"), "only a blocks or expiry range"),
    (("r", 1, "ids", 1, 2, "yesterday"), "ISO-8601"),
    (("r", 1, "ids", 1, 2, "2020-01-01T00:00:00"), "UTC offset"),
    (("r", 1, "ids", 1, 2, 1577836800), "ISO-8601"),
    (("r", 1, "ids", 1, 2, "2020-01-01T00:00:00+00:00", 3, 0), "lo_id and hi_id belong to"),
    (("r", 1, "expiry", 5, 5, "2020-01-01T00:00:00+00:00", 7, 7), "hi must be above lo"),
    (("r", 1, "expiry", 5, 9, "2020-01-01T00:00:00+00:00", -1, 0), "lo_id must be at least 0"),
    (("r", 1, "expiry", 5, 9, "2020-01-01T00:00:00+00:00", 0, "2"), "hi_id must be a whole"),
])
def test_bad_chunk_arguments_are_refused(args: tuple[Any, ...], needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        chunk.check_chunk_args(*args)


# --- custom backend -----------------------------------------------------------------------------


class RecordingBackend(BaseStateBackend):
    """A custom state backend: cleans itself through its cleanup() hook."""

    cleaned: ClassVar[list[Settings]] = []

    def cleanup(self) -> None:
        RecordingBackend.cleaned.append(self.settings)


def test_custom_backend_is_cleaned_by_its_own_hook(db: Db) -> None:
    RecordingBackend.cleaned.clear()
    settings = dataclasses.replace(db.settings, state_backend=f"{__name__}.RecordingBackend")
    settings.check()
    outbox = Outbox()
    with capture_logs() as logs:
        summary = coordinator.coordinate(settings, db.engine, db.tables, db.store, outbox)
    assert summary.status == "custom_backend" and RecordingBackend.cleaned == [settings]
    [skip] = events(logs, "custom backend configured; skipping")
    assert skip["backend"] == f"{__name__}.RecordingBackend"
    assert outbox.sent == [] and db.store.recent() == [] and db.store.active_run() is None
    assert len(task_state_rows(db.engine, db.tables)) == SPEC.rows
