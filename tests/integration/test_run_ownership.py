"""Issue 21: only the owner of a run changes it, the cron path frees its lock whatever happens,
and a chunk's rows are counted once whichever copy of it finishes first. On PostgreSQL, with the
run store on a real Redis and on memory:// (the integration conftest's ``store``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from tests.cleanup_runs import Outbox, deliver
from tests.conftest import create_schema, database_now
from tests.integration.test_cli import Seeded
from tests.reliability.faults import hold_row_lock
from tests.services import REDIS_URL
from workers import chunk, cleanup, coordinator
from workers.runs import RunStore
from workers.schema import Tables
from workers.seed import SeedSpec, expected_survivors, seed
from workers.settings import Settings

pytestmark = pytest.mark.integration

SPEC = SeedSpec(rows=2000)


@dataclass
class Pg:
    engine: Engine
    tables: Tables
    settings: Settings
    store: RunStore
    expired: int

    def coordinate(self, outbox: Outbox, **kw: Any) -> coordinator.RunSummary:
        return coordinator.coordinate(self.settings, self.engine, self.tables, self.store,
                                      outbox, source="test", **kw)

    def deliver(self, outbox: Outbox) -> list[chunk.ChunkResult]:
        return deliver(self.settings, self.engine, self.tables, self.store, outbox)

    def survivors(self) -> set[tuple[int, str]]:
        t = self.tables.task_state
        with self.engine.connect() as conn:
            return {(int(r.id), str(r.value)) for r in conn.execute(select(t.c.id, t.c.value))}

    def expired_now(self) -> int:
        t = self.tables.task_state
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(t)
                                    .where(t.c.expires_at < func.now())).scalar_one())

    def first_expired_id(self) -> int:
        t = self.tables.task_state
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.min(t.c.id))
                                    .where(t.c.expires_at < func.now())).scalar_one())


@pytest.fixture
def pg(pg_url: str, store: RunStore, make_settings: Callable[..., Settings]) -> Iterator[Pg]:
    engine, tables = create_schema(pg_url)
    counts = seed(engine, tables, SPEC, database_now(engine))
    settings = make_settings(database_url=pg_url, planner="ids", cleanup_batch_size=100,
                             max_chunks_in_flight=3, lock_timeout_ms=100)
    yield Pg(engine, tables, settings, store, counts.expired)
    engine.dispose()


def events(logs: list[Any], name: str) -> list[Any]:
    return [e for e in logs if e["event"] == name]


# --- item 1: a duplicate coordinator delivery never fails the run it duplicates --------------


def test_a_duplicate_that_errs_while_the_first_delivery_plans_leaves_the_run_to_it(
        pg: Pg, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both deliveries of one coordinator message pass the lock (same run id). The duplicate
    fails (its database read errs) while the first is between planning and START: it used to
    mark the queued run failed and free the lock, so the first lost it and no row was deleted."""
    pg.store.enqueue("dup", "test")
    first = Outbox()
    real_start = pg.store.start

    def duplicate_errs_first(run_id: str, *args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(pg.store, "start", real_start)

        def database_down(_engine: Engine) -> Any:
            raise OperationalError("SELECT now()", {}, Exception("connection refused"))

        with monkeypatch.context() as m, capture_logs() as logs:
            m.setattr(cleanup, "read_cutoff", database_down)
            with pytest.raises(OperationalError):
                pg.coordinate(Outbox(), run_id=run_id)
        [refused] = events(logs, "cleanup_run_fail_refused")
        assert refused["state"] == "planning"
        assert not events(logs, "cleanup_run_failed")
        return real_start(run_id, *args, **kwargs)

    monkeypatch.setattr(pg.store, "start", duplicate_errs_first)
    summary = pg.coordinate(first, run_id="dup")
    assert summary.status == "started"
    record = pg.store.get("dup")
    assert record is not None and record.state == "running"
    assert pg.store.active_run() == "dup"
    pg.deliver(first)
    done = pg.store.get("dup")
    assert done is not None and (done.state, done.rows_deleted) == ("finished", pg.expired)
    assert pg.expired_now() == 0 and pg.survivors() == expected_survivors(SPEC)
    assert pg.store.active_run() is None


def test_a_duplicate_delivered_while_the_run_runs_never_fails_it(pg: Pg) -> None:
    """The same run id delivered again while its run is running and its lock lapsed: the
    duplicate takes the lock back for it and resumes it; the run finishes with every expired
    row deleted."""
    first = Outbox()
    assert pg.coordinate(first, run_id="r1").status == "started"
    pg.store.client.delete(f"{pg.store.prefix}:lock")  # the keeper stalled: the TTL ran out
    with capture_logs() as logs:
        again = pg.coordinate(Outbox(), run_id="r1")
    assert again.status == "resumed", again
    assert not events(logs, "cleanup_run_failed")
    record = pg.store.get("r1")
    assert record is not None and record.state == "running"
    # A duplicate that lost its lock between planning and START must not fail it either.
    assert pg.store.fail("r1", "LockLost: run r1 could not start", started=False) == "running"
    pg.deliver(first)
    done = pg.store.get("r1")
    assert done is not None and (done.state, done.rows_deleted) == ("finished", pg.expired)
    assert pg.expired_now() == 0 and pg.survivors() == expected_survivors(SPEC)
    assert pg.store.active_run() is None


def test_a_run_whose_lapsed_lock_another_run_took_ends_and_its_chunks_change_nothing(
        pg: Pg) -> None:
    """Issue 21, repro 2: the lock lapsed and another run took it. The old run ends 'failed'
    in the same step (saying why), so two runs never go on at once; its duplicate delivery
    tops the new holder up and fails nothing; its chunks still in the broker delete and count
    nothing; the next run deletes what it left."""
    first = Outbox()
    assert pg.coordinate(first, run_id="r1").status == "started"
    pg.store.client.delete(f"{pg.store.prefix}:lock")  # the keeper stalled: the TTL ran out
    assert pg.store.acquire("r2", 60) is None
    ended = pg.store.get("r1")
    assert ended is not None and ended.state == "failed"
    assert "lock lapsed" in ended.error and "r2" in ended.error
    with capture_logs() as logs:
        again = pg.coordinate(Outbox(), run_id="r1")
    assert again.status == "skipped" and again.active_run_id == "r2", again
    assert not events(logs, "cleanup_run_failed")
    left = pg.expired_now()
    results = pg.deliver(first)
    assert {r.status for r in results} == {"ended"} and pg.expired_now() == left
    assert pg.store.get("r1") == ended and pg.store.active_run() == "r2"
    pg.store.release("r2")
    outbox = Outbox()
    assert pg.coordinate(outbox, run_id="r3").status == "started"
    pg.deliver(outbox)
    done = pg.store.get("r3")
    assert done is not None and (done.state, done.rows_deleted) == ("finished", left)
    assert pg.expired_now() == 0 and pg.survivors() == expected_survivors(SPEC)


def test_the_process_that_started_a_run_fails_it_once_its_lock_has_lapsed(pg: Pg) -> None:
    assert pg.coordinate(Outbox(), run_id="r1").status == "started"
    pg.store.client.delete(f"{pg.store.prefix}:lock")
    assert pg.store.fail("r1", "its own error", started=True) == "failed"
    assert pg.store.acquire("r2", 60) is None
    assert pg.store.fail("r2", "r1's error again", started=True) == "failed"  # queued r2: own
    assert pg.store.active_run() is None


# --- item 4: the cron path frees its lock on every exit --------------------------------------


def test_a_local_run_whose_chunk_keeps_hitting_its_lock_timeout_fails_and_frees_the_lock(
        pg: Pg) -> None:
    with hold_row_lock(pg.engine, pg.tables.task_state.name, pg.first_expired_id()), \
            capture_logs() as logs, pytest.raises(OperationalError):
        chunk.run_local(pg.settings, pg.engine, pg.tables, pg.store, source="test")
    retries = events(logs, "chunk_retry")
    assert len(retries) == chunk.LOCAL_LOCK_RETRIES
    [failed] = events(logs, "cleanup_run_failed")
    record = pg.store.get(failed["run_id"])
    assert record is not None and record.state == "failed" and "lock" in record.error
    assert pg.store.active_run() is None
    # The next cron run is not refused, and deletes what the failed one left.
    later = chunk.run_local(pg.settings, pg.engine, pg.tables, pg.store, source="test")
    done = pg.store.get(later.run_id)
    assert done is not None and done.state == "finished"
    assert done.rows_deleted + record.rows_deleted == pg.expired
    assert pg.expired_now() == 0 and pg.store.active_run() is None


def test_a_local_run_retries_a_lock_timeout_with_smaller_chunks_and_finishes(pg: Pg) -> None:
    locked = threading.Event()

    def writer_holds_a_row_briefly() -> None:
        with hold_row_lock(pg.engine, pg.tables.task_state.name, pg.first_expired_id()):
            locked.set()
            time.sleep(0.6)

    holder = threading.Thread(target=writer_holds_a_row_briefly)
    holder.start()
    assert locked.wait(10)
    try:
        with capture_logs() as logs:
            summary = chunk.run_local(pg.settings, pg.engine, pg.tables, pg.store,
                                      source="test")
    finally:
        holder.join()
    assert events(logs, "chunk_retry") and all(
        e["reason"] == "lock timeout" for e in events(logs, "chunk_retry"))
    record = pg.store.get(summary.run_id)
    assert record is not None and (record.state, record.rows_deleted) == ("finished",
                                                                         pg.expired)
    assert pg.expired_now() == 0 and pg.store.active_run() is None


def test_a_local_run_started_behind_a_running_run_leaves_it_alone(pg: Pg) -> None:
    first = Outbox()
    assert pg.coordinate(first, run_id="r1").status == "started"
    before = pg.store.get("r1")
    summary = chunk.run_local(pg.settings, pg.engine, pg.tables, pg.store, source="test")
    assert (summary.status, summary.active_run_id) == ("skipped", "r1")
    after = pg.store.get("r1")
    assert before is not None and after is not None
    assert after.chunks_planned == before.chunks_planned and after.state == "running"
    assert pg.store.active_run() == "r1"


# --- item 5: a chunk's rows counted once, whichever copy finishes first -----------------------


def test_carried_rows_are_counted_when_the_resent_copy_finished_first(
        pg: Pg, monkeypatch: pytest.MonkeyPatch) -> None:
    """The original copy deletes its rows and commits, but the run store does not answer its
    FINISH (the task retries, carrying the rows). The pump's resent copy runs meanwhile: its
    DELETE finds nothing left, and it is counted first. The original's retry is then a
    duplicate, and used to drop the rows it carried: the run reported fewer rows than were
    deleted. On PostgreSQL the original noted its commit before it (workers.chunk.CommitNotes):
    it carries nothing, and the resent copy counts the noted rows with its own."""
    outbox = Outbox()
    assert pg.coordinate(outbox, run_id="r1").status == "started"
    message = outbox.queue.popleft()
    real_finish = pg.store.finish_chunk

    def unanswered(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(pg.store, "finish_chunk", real_finish)
        raise ConnectionError("the run store did not answer")

    monkeypatch.setattr(pg.store, "finish_chunk", unanswered)
    with pytest.raises(chunk.ProgressNotRecorded) as original:
        chunk.run_chunk(pg.settings, pg.engine, pg.tables, pg.store, outbox, message.args())
    carried = original.value.rows
    noted = sum(pg.store.commit_notes("r1", message.number).values())
    assert carried == 0 and noted > 0
    resent = chunk.run_chunk(pg.settings, pg.engine, pg.tables, pg.store, outbox,
                             message.args())
    assert (resent.status, resent.rows, resent.counted) == ("deleted", noted, True)
    assert pg.store.commit_notes("r1", message.number) == {}
    retried = chunk.run_chunk(pg.settings, pg.engine, pg.tables, pg.store, outbox,
                              message.args(), carried_rows=carried)
    assert retried.status == "duplicate"
    pg.deliver(outbox)
    done = pg.store.get("r1")
    assert done is not None and done.state == "finished"
    assert pg.expired_now() == 0 and pg.survivors() == expected_survivors(SPEC)
    assert done.rows_deleted == pg.expired


def test_carried_rows_are_counted_when_the_resent_copy_finished_the_run(
        pg: Pg, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, with the resent copy the run's last chunk: the original's retry finds the run
    ended, and its carried rows still count."""
    outbox = Outbox()
    assert pg.coordinate(outbox, run_id="r1").status == "started"
    message = outbox.queue.popleft()
    pg.deliver(outbox)  # every other chunk first
    real_finish = pg.store.finish_chunk

    def unanswered(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(pg.store, "finish_chunk", real_finish)
        raise ConnectionError("the run store did not answer")

    monkeypatch.setattr(pg.store, "finish_chunk", unanswered)
    with pytest.raises(chunk.ProgressNotRecorded) as original:
        chunk.run_chunk(pg.settings, pg.engine, pg.tables, pg.store, outbox, message.args())
    noted = sum(pg.store.commit_notes("r1", message.number).values())
    assert original.value.rows == 0 and noted > 0  # in the original's commit note
    resent = chunk.run_chunk(pg.settings, pg.engine, pg.tables, pg.store, outbox,
                             message.args())
    assert resent.status == "deleted" and resent.rows == noted
    assert (pg.store.get("r1") or pytest.fail("no record")).state == "finished"
    retried = chunk.run_chunk(pg.settings, pg.engine, pg.tables, pg.store, outbox,
                              message.args(), carried_rows=original.value.rows)
    assert retried.status == "ended"
    done = pg.store.get("r1")
    assert done is not None and done.rows_deleted == pg.expired
    assert pg.expired_now() == 0


def test_cleanup_local_frees_its_lock_after_a_lock_timeout_and_the_next_one_runs(
        seeded: Seeded) -> None:
    """The cron path end to end: a writer holds a row the first chunk must delete for longer
    than every retry waits. `cleanup --local` fails (non-zero), its run is failed and its lock
    free; a second `--local` while a run holds the lock names it; the next cron run works."""
    from workers.exit_codes import EXIT_OK, EXIT_REFUSED
    from workers.runs import registry_for

    registry = registry_for(REDIS_URL, seeded.env["STATESWEEP_KEY_PREFIX"])
    t = seeded.tables.task_state
    with seeded.engine.connect() as conn:
        first = int(conn.execute(select(func.min(t.c.id))
                                 .where(t.c.expires_at < func.now())).scalar_one())
    fast = {"STATESWEEP_LOCK_TIMEOUT_MS": "100"}
    with hold_row_lock(seeded.engine, t.name, first):
        failed = seeded.invoke("cleanup", "--local", "--batch-size", "3000", **fast)
    assert failed.exit_code != EXIT_OK
    assert registry.active_run() is None
    [record] = [r for r in registry.recent() if r.source == "cli-local"]
    assert record.state == "failed" and "lock" in record.error.lower()

    assert registry.acquire("cron-1", 60) is None
    try:
        refused = seeded.invoke("cleanup", "--local", **fast)
    finally:
        registry.release("cron-1")
    assert refused.exit_code == EXIT_REFUSED
    assert [line for line in refused.stderr.splitlines() if "cron-1" in line] == [
        line for line in refused.stderr.splitlines() if line.strip()][-1:]

    ok = seeded.invoke("cleanup", "--local", "--batch-size", "3000", **fast)
    assert ok.exit_code == EXIT_OK, ok.stderr
    assert seeded.expired_now() == 0 and registry.active_run() is None
