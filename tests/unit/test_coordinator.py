"""The cleanup run as plain functions: coordinate(), run_chunk(), run_local() and the orphan
sweep, with an in-process run registry and a fake dispatch. The database is SQLite (embedded, no
service); the same functions run under real workers in tests/acceptance/test_pipeline.py.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from sqlalchemy import Engine, event, insert, select
from structlog.testing import capture_logs

from tests.conftest import create_schema, database_now
from workers import cleanup, coordinator
from workers.cleanup import Chunk
from workers.exceptions import InvalidArgument, NotFound
from workers.runs import MemoryRunRegistry
from workers.schema import Tables
from workers.seed import (
    ROWS_PER_RUN,
    SeedSpec,
    asset_state_rows,
    expected_live_asset_state,
    expected_survivors,
    kind_of,
    seed,
    task_state_rows,
)
from workers.settings import Settings
from workers.store import BaseStateBackend, MetastoreStateBackend, TaskScope

SPEC = SeedSpec(rows=2000, assets=30)
EXPIRED = 1100  # 11 of every 20 rows
BATCH = 100


@dataclass
class Db:
    engine: Engine
    tables: Tables
    settings: Settings
    registry: MemoryRunRegistry


@pytest.fixture
def db(sqlite_url: str, make_settings: Callable[..., Settings]) -> Iterator[Db]:
    engine, tables = create_schema(sqlite_url, "seed")
    seed(engine, tables, SPEC, database_now(engine))
    settings = make_settings(database_url=sqlite_url, run_store_url="memory://",
                             cleanup_batch_size=BATCH)
    yield Db(engine, tables, settings, MemoryRunRegistry())
    engine.dispose()


@dataclass
class Sent:
    run_id: str
    chunk: Chunk
    cutoff: str
    state_when_sent: str
    planned_when_sent: int


def collecting(db: Db) -> tuple[list[Sent], coordinator.Dispatch]:
    """A dispatch that keeps each chunk instead of sending it, noting the run's state then."""
    sent: list[Sent] = []

    def dispatch(run_id: str, chunk: Chunk, cutoff: str) -> None:
        record = db.registry.get(run_id)
        assert record is not None
        sent.append(Sent(run_id, chunk, cutoff, record.state, record.chunks_planned))

    return sent, dispatch


def run_chunks(db: Db, sent: list[Sent]) -> list[int]:
    return [coordinator.run_chunk(db.settings, db.engine, db.tables, db.registry,
                                  coordinator.check_chunk_args(s.run_id, s.chunk.number,
                                                               s.chunk.lo, s.chunk.hi, s.cutoff))
            for s in sent]


def expired_ids() -> set[int]:
    return {i + 1 for i in range(SPEC.rows) if kind_of(i, SPEC) == "expired"}


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# --- planning -----------------------------------------------------------------------------------


def test_plan_cuts_ranges_of_batch_expired_rows_and_sends_each_while_planning(db: Db) -> None:
    sent, dispatch = collecting(db)
    summary = coordinator.coordinate(db.settings, db.engine, db.tables, db.registry, dispatch,
                                     source="test")

    assert (summary.status, summary.chunks, summary.expected_rows) == ("started", 11, EXPIRED)
    chunks = [s.chunk for s in sent]
    assert [c.number for c in chunks] == list(range(1, 12))
    assert all(c.expected <= BATCH for c in chunks)
    # Ranges ascend without overlap, and every expired id falls in exactly one of them.
    assert all(a.hi < b.lo for a, b in zip(chunks, chunks[1:], strict=False))
    for i in expired_ids():
        assert sum(c.lo <= i <= c.hi for c in chunks) == 1, i
    # Each chunk went out while the run was still planning, counted before it was sent.
    assert {s.state_when_sent for s in sent} == {"planning"}
    assert [s.planned_when_sent for s in sent] == [c.number for c in chunks]
    assert {s.cutoff for s in sent} == {summary.cutoff}

    record = db.registry.get(summary.run_id)
    assert record is not None
    assert (record.state, record.planning_done, record.chunks_planned,
            record.expected_rows, record.source) == ("running", True, 11, EXPIRED, "test")
    # The planned run keeps the single-flight lock until its last chunk is done.
    assert db.registry.active_run() == summary.run_id


def test_planning_never_fetches_the_id_list(db: Db) -> None:
    """O(1) memory: each planning query is an aggregate or a LIMIT of at most two ids, one per
    chunk, so what Python holds does not grow with the table."""
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        statements.append(" ".join(statement.upper().split()))

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        cutoff = cleanup.read_cutoff(db.engine)
        chunks = list(cleanup.plan_chunks(db.engine, db.tables, cutoff, BATCH))
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    assert len(chunks) == 11
    planning = [s for s in statements if s.startswith("SELECT")]
    bounded = re.compile(r"LIMIT \?|^SELECT (MIN|MAX|COUNT)\(")
    assert planning and all(bounded.search(s) for s in planning), planning
    assert len(planning) <= 2 + 2 * len(chunks)


def test_batch_size_zero_makes_one_chunk(db: Db) -> None:
    sent, dispatch = collecting(db)
    summary = coordinator.coordinate(db.settings, db.engine, db.tables, db.registry, dispatch,
                                     batch_size=0)
    assert (summary.chunks, summary.expected_rows) == (1, EXPIRED)
    [only] = [s.chunk for s in sent]
    assert (only.lo, only.hi, only.expected) == (min(expired_ids()), max(expired_ids()), EXPIRED)
    assert run_chunks(db, sent) == [EXPIRED]
    assert task_state_rows(db.engine, db.tables) == expected_survivors(SPEC)


def test_nothing_expired_finishes_the_run_at_once(sqlite_url: str,
                                                  make_settings: Callable[..., Settings]) -> None:
    engine, tables = create_schema(sqlite_url, "seed")
    db = Db(engine, tables, make_settings(database_url=sqlite_url, run_store_url="memory://"),
            MemoryRunRegistry())
    sent, dispatch = collecting(db)
    with capture_logs() as logs:
        summary = coordinator.coordinate(db.settings, engine, tables, db.registry, dispatch)
    assert (summary.status, summary.chunks, sent) == ("finished", 0, [])
    assert len(events(logs, "cleanup_run_finished")) == 1
    assert db.registry.active_run() is None
    engine.dispose()


@pytest.mark.parametrize("bad", [-1, "10", 2.5, True])
def test_bad_batch_size_fails_before_anything_happens(db: Db, bad: Any) -> None:
    sent, dispatch = collecting(db)
    with pytest.raises(InvalidArgument, match="batch_size"):
        coordinator.coordinate(db.settings, db.engine, db.tables, db.registry, dispatch,
                               batch_size=bad)
    assert sent == [] and db.registry.recent() == [] and db.registry.active_run() is None


# --- single flight ------------------------------------------------------------------------------


def test_trigger_while_a_run_is_active_plans_nothing_and_names_the_run(db: Db) -> None:
    sent, dispatch = collecting(db)
    first = coordinator.coordinate(db.settings, db.engine, db.tables, db.registry, dispatch)
    with capture_logs() as logs:
        second = coordinator.coordinate(db.settings, db.engine, db.tables, db.registry, dispatch,
                                        source="adhoc")
    assert (second.status, second.active_run_id, second.chunks) == ("skipped", first.run_id, 0)
    assert len(sent) == first.chunks
    assert [r.run_id for r in db.registry.recent()] == [first.run_id]
    [skip] = events(logs, "coordinator_skipped_active_run")
    assert (skip["active_run_id"], skip["run_id"], skip["source"]) == (
        first.run_id, second.run_id, "adhoc")
    assert events(logs, "cleanup_run_started") == []

    # Once the last chunk is done the lock is free and the next trigger plans a new run.
    run_chunks(db, sent)
    assert db.registry.active_run() is None
    third = coordinator.coordinate(db.settings, db.engine, db.tables, db.registry, dispatch)
    assert third.status == "finished" and third.chunks == 0  # nothing left to delete


def test_lock_is_renewed_while_planning_outlasts_its_ttl(db: Db) -> None:
    settings = dataclasses.replace(db.settings, lock_ttl_seconds=1)
    seen: list[tuple[str | None, str]] = []

    def slow_dispatch(run_id: str, chunk: Chunk, cutoff: str) -> None:
        time.sleep(0.5)  # three chunks take 1.5 s, longer than the 1 s TTL
        other = coordinator.coordinate(settings, db.engine, db.tables, db.registry,
                                       slow_dispatch)
        seen.append((db.registry.active_run(), other.status))

    summary = coordinator.coordinate(settings, db.engine, db.tables, db.registry, slow_dispatch,
                                     batch_size=400)
    assert summary.chunks == 3
    assert seen == [(summary.run_id, "skipped")] * 3


def test_planning_stops_when_the_lock_passes_to_another_run(db: Db) -> None:
    settings = dataclasses.replace(db.settings, lock_ttl_seconds=1)
    sent: list[int] = []

    def dispatch_then_lose_lock(run_id: str, chunk: Chunk, cutoff: str) -> None:
        sent.append(chunk.number)
        if chunk.number == 1:
            db.registry.release(run_id)
            assert db.registry.acquire("someone-else", 60) is None
            time.sleep(0.6)  # the keeper's next renewal (every ttl/3) finds the lock gone

    with capture_logs() as logs, pytest.raises(coordinator.LockLost):
        coordinator.coordinate(settings, db.engine, db.tables, db.registry,
                               dispatch_then_lose_lock)
    assert sent == [1]
    [record] = db.registry.recent()
    assert record.state == "failed" and "LockLost" in record.error
    assert db.registry.active_run() == "someone-else"  # failing never frees another run's lock
    assert len(events(logs, "cleanup_run_failed")) == 1


# --- chunks -------------------------------------------------------------------------------------


def test_run_local_deletes_exactly_the_expired_rows_and_logs_each_chunk(db: Db) -> None:
    before_assets = asset_state_rows(db.engine, db.tables)
    with capture_logs() as logs:
        summary = coordinator.run_local(db.settings, db.engine, db.tables, db.registry)
    assert task_state_rows(db.engine, db.tables) == expected_survivors(SPEC)
    assert asset_state_rows(db.engine, db.tables) == before_assets  # retention never touches it

    deleted = events(logs, "chunk_deleted")
    assert len(deleted) == summary.chunks == 11
    assert all(e["run_id"] == summary.run_id and 0 < e["rows"] <= BATCH and e["counted"]
               and e["lo"] <= e["hi"] and e["ms"] >= 0 for e in deleted)
    assert sum(e["rows"] for e in deleted) == EXPIRED
    [finished] = events(logs, "cleanup_run_finished")
    assert (finished["run_id"], finished["rows"], finished["chunks"]) == (
        summary.run_id, EXPIRED, 11)
    assert finished["duration"] >= 0 and finished["rows_per_second"] >= 0
    [started] = events(logs, "cleanup_run_started")
    assert started["cutoff"] == summary.cutoff
    record = db.registry.get(summary.run_id)
    assert record is not None and (record.state, record.rows_deleted) == ("finished", EXPIRED)


def test_row_refreshed_after_planning_survives_its_chunk(db: Db) -> None:
    sent, dispatch = collecting(db)
    summary = coordinator.coordinate(db.settings, db.engine, db.tables, db.registry, dispatch)
    backend = MetastoreStateBackend(db.settings, db.engine, db.tables)
    refreshed = sorted(expired_ids())[::97]
    for row_id in refreshed:
        i = row_id - 1
        run = i // ROWS_PER_RUN
        scope = TaskScope(f"dag_{run % 50}", f"run_{run}", f"task_{(i // 10) % 10}")
        backend.set(scope, f"key_{i}", f"refreshed_{i}")

    rows = run_chunks(db, sent)
    assert sum(rows) == EXPIRED - len(refreshed)
    assert task_state_rows(db.engine, db.tables) == expected_survivors(SPEC) | {
        (row_id, f"refreshed_{row_id - 1}") for row_id in refreshed}
    record = db.registry.get(summary.run_id)
    assert record is not None
    assert (record.state, record.rows_deleted, record.expected_rows) == (
        "finished", EXPIRED - len(refreshed), EXPIRED)


def test_chunk_run_twice_deletes_nothing_more_and_the_run_finishes_once(db: Db) -> None:
    sent, dispatch = collecting(db)
    summary = coordinator.coordinate(db.settings, db.engine, db.tables, db.registry, dispatch)
    with capture_logs() as logs:
        first = run_chunks(db, sent)
        again = run_chunks(db, sent)  # every chunk redelivered after it finished
    assert sum(first) == EXPIRED and again == [0] * len(sent)
    assert [e["counted"] for e in events(logs, "chunk_deleted")] == [True] * 11 + [False] * 11
    assert len(events(logs, "cleanup_run_finished")) == 1
    record = db.registry.get(summary.run_id)
    assert record is not None and (record.chunks_done, record.rows_deleted) == (11, EXPIRED)


class FlakyCount(MemoryRunRegistry):
    """Counting fails once, as when Redis drops the connection after the DELETE committed."""

    failed = False

    def chunk_done(self, run_id: str, chunk: int, rows: int,
                   lock_ttl: int) -> tuple[bool, Any]:
        if not self.failed:
            self.failed = True
            raise ConnectionError("run store went away")
        return super().chunk_done(run_id, chunk, rows, lock_ttl)


def test_rows_deleted_but_not_counted_are_carried_into_the_retry(db: Db) -> None:
    db.registry = FlakyCount()
    sent, dispatch = collecting(db)
    summary = coordinator.coordinate(db.settings, db.engine, db.tables, db.registry, dispatch)
    s = sent[0]
    args = coordinator.check_chunk_args(s.run_id, s.chunk.number, s.chunk.lo, s.chunk.hi,
                                        s.cutoff)
    with pytest.raises(coordinator.ProgressNotRecorded) as lost:
        coordinator.run_chunk(db.settings, db.engine, db.tables, db.registry, args)
    assert lost.value.rows == BATCH
    assert coordinator.run_chunk(db.settings, db.engine, db.tables, db.registry, args,
                                 carried_rows=lost.value.rows) == BATCH
    run_chunks(db, sent[1:])
    record = db.registry.get(summary.run_id)
    assert record is not None and (record.state, record.rows_deleted) == ("finished", EXPIRED)


@pytest.mark.parametrize(("args", "needle"), [
    (("", 1, 1, 2, "2020-01-01T00:00:00+00:00"), "run_id"),
    (("r", "1", 1, 2, "2020-01-01T00:00:00+00:00"), "chunk"),
    (("r", 1, 5, 2, "2020-01-01T00:00:00+00:00"), "lo must not exceed hi"),
    (("r", 1, 1, True, "2020-01-01T00:00:00+00:00"), "hi"),
    (("r", 1, 1, 2, "yesterday"), "ISO-8601"),
    (("r", 1, 1, 2, "2020-01-01T00:00:00"), "UTC offset"),
    (("r", 1, 1, 2, 1577836800), "ISO-8601"),
])
def test_bad_chunk_arguments_are_refused(args: tuple[Any, ...], needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        coordinator.check_chunk_args(*args)


def test_chunk_of_unknown_run_or_foreign_cutoff_deletes_nothing(db: Db) -> None:
    sent, dispatch = collecting(db)
    coordinator.coordinate(db.settings, db.engine, db.tables, db.registry, dispatch)
    s = sent[0]
    before = task_state_rows(db.engine, db.tables)
    with pytest.raises(NotFound, match="unknown run id"):
        coordinator.run_chunk(db.settings, db.engine, db.tables, db.registry,
                              coordinator.check_chunk_args("nope", 1, s.chunk.lo, s.chunk.hi,
                                                           s.cutoff))
    with pytest.raises(InvalidArgument, match="is not run"):
        coordinator.run_chunk(db.settings, db.engine, db.tables, db.registry,
                              coordinator.check_chunk_args(s.run_id, 1, s.chunk.lo, s.chunk.hi,
                                                           "2999-01-01T00:00:00+00:00"))
    assert task_state_rows(db.engine, db.tables) == before


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
    sent, dispatch = collecting(db)
    with capture_logs() as logs:
        summary = coordinator.coordinate(settings, db.engine, db.tables, db.registry, dispatch)
    assert summary.status == "custom_backend"
    assert RecordingBackend.cleaned == [settings]
    [skip] = events(logs, "custom backend configured; skipping")
    assert skip["backend"] == f"{__name__}.RecordingBackend"
    assert sent == [] and db.registry.recent() == [] and db.registry.active_run() is None
    assert len(task_state_rows(db.engine, db.tables)) == SPEC.rows


# --- orphaned asset state -----------------------------------------------------------------------


def test_orphan_sweep_deletes_in_batches_and_touches_only_orphans(db: Db) -> None:
    orphans = len(asset_state_rows(db.engine, db.tables)) - len(expected_live_asset_state(SPEC))
    assert orphans == 50  # 10 of 30 assets inactive, 5 keys each
    batches: list[int] = []
    result = cleanup.sweep_orphaned_asset_state(db.engine, db.tables, 7,
                                                on_batch=lambda rows, ms: batches.append(rows))
    assert (result.rows, result.batches) == (50, 8)
    assert batches == [7] * 7 + [1]
    assert asset_state_rows(db.engine, db.tables) == expected_live_asset_state(SPEC)
    assert len(task_state_rows(db.engine, db.tables)) == SPEC.rows  # task state untouched
    again = cleanup.sweep_orphaned_asset_state(db.engine, db.tables, 7)
    assert again.rows == 0


def test_orphan_sweep_rechecks_orphanhood_in_every_batch(db: Db) -> None:
    """An asset re-activated while the sweep runs keeps its state."""
    a, aa = db.tables.asset, db.tables.asset_active
    last_inactive = max(k for k in range(SPEC.assets) if k % SPEC.inactive_every == 0)

    def reactivate_after_first_batch(rows: int, ms: float) -> None:
        with db.engine.begin() as conn:
            if conn.execute(select(aa).where(aa.c.name == f"asset_{last_inactive}")).first():
                return
            asset = conn.execute(select(a.c.name, a.c.uri)
                                 .where(a.c.id == last_inactive + 1)).one()
            conn.execute(insert(aa).values(name=asset.name, uri=asset.uri))

    result = cleanup.sweep_orphaned_asset_state(db.engine, db.tables, 5,
                                                on_batch=reactivate_after_first_batch)
    assert result.rows == 45
    kept = {(last_inactive + 1, f"k{j}") for j in range(SPEC.keys_per_asset)}
    assert asset_state_rows(db.engine, db.tables) == expected_live_asset_state(SPEC) | kept


def test_orphan_sweep_batch_size_zero_is_one_statement(db: Db) -> None:
    result = cleanup.sweep_orphaned_asset_state(db.engine, db.tables, 0)
    assert (result.rows, result.batches) == (50, 1)




# --- wiring: the Celery app and the beat schedule -----------------------------------------------


def test_celery_config_holds_the_delivery_guarantees(
        make_settings: Callable[..., Settings]) -> None:
    from workers.celery_app import celery_config

    s = make_settings(broker_url="redis://b:6379/1", result_backend="redis://r:6379/2",
                      chunk_soft_time_limit=50, chunk_time_limit=60, visibility_timeout=600)
    c = celery_config(s)
    assert (c["broker_url"], c["result_backend"]) == ("redis://b:6379/1", "redis://r:6379/2")
    assert c["task_acks_late"] is True and c["task_reject_on_worker_lost"] is True
    assert c["worker_prefetch_multiplier"] == 1
    assert (c["task_soft_time_limit"], c["task_time_limit"]) == (50, 60)
    for options in (c["broker_transport_options"], c["result_backend_transport_options"]):
        assert options["visibility_timeout"] == 600
    assert c["broker_connection_retry_on_startup"] is True
    assert c["worker_send_task_events"] is True and c["task_send_sent_event"] is True
    assert c["worker_hijack_root_logger"] is False


def test_every_task_is_routed_to_a_declared_queue(make_settings: Callable[..., Settings]) -> None:
    import workers.tasks  # noqa: F401 - registers the tasks on the worker's app
    from workers.celery_app import COORDINATE, DELETE_CHUNK, SWEEP_ORPHANS, app, build_app

    s = make_settings(control_queue="q.control", chunk_queue="q.chunks")
    client = build_app(s, include_tasks=False)
    registered = {name for name in app.tasks if name.startswith("statesweep.")}
    assert registered == {COORDINATE, DELETE_CHUNK, SWEEP_ORPHANS}
    expected = {COORDINATE: "q.control", SWEEP_ORPHANS: "q.control", DELETE_CHUNK: "q.chunks"}
    for name, queue in expected.items():
        assert client.amqp.router.route({}, name)["queue"].name == queue, name
    # Anything unrouted lands on the control queue, which every worker consumes.
    assert client.amqp.router.route({}, "celery.some_builtin")["queue"].name == "q.control"
    declared = client.amqp.queues
    assert set(declared) == {"q.control", "q.chunks"}
    for q in declared.values():
        # Own exchange and key: a message for one queue can never be bound into the other.
        assert (q.exchange.name, q.routing_key) == (q.name, q.name)


def test_beat_schedule_defaults_each_entry_expires() -> None:
    from beat_schedule import build_beat_schedule
    from workers.celery_app import COORDINATE, SWEEP_ORPHANS

    entries = build_beat_schedule(Settings())
    coord = entries["statesweep-cleanup-task-state"]
    orphans = entries["statesweep-sweep-orphaned-asset-state"]
    assert (coord["task"], coord["schedule"], coord["options"]) == (
        COORDINATE, 600.0, {"queue": "statesweep.control", "expires": 600.0})
    assert (orphans["task"], orphans["schedule"], orphans["options"]) == (
        SWEEP_ORPHANS, 300.0, {"queue": "statesweep.control", "expires": 300.0})


def test_beat_schedule_takes_seconds_or_crontab(make_settings: Callable[..., Settings]) -> None:
    from celery.schedules import crontab

    from beat_schedule import build_beat_schedule

    entries = build_beat_schedule(make_settings(coordinator_schedule="*/10 2-4 * * 1-5",
                                                orphan_schedule="45", control_queue="ctl"))
    coord = entries["statesweep-cleanup-task-state"]
    assert isinstance(coord["schedule"], crontab)
    assert coord["schedule"] == crontab(minute="*/10", hour="2-4", day_of_week="1-5")
    assert coord["options"]["expires"] > 0
    orphans = entries["statesweep-sweep-orphaned-asset-state"]
    assert (orphans["schedule"], orphans["options"]) == (45.0, {"queue": "ctl", "expires": 45.0})


def test_chunk_retries_back_off_exponentially_with_jitter() -> None:
    from workers.tasks import _backoff

    for retries in range(12):
        waits = [_backoff(retries) for _ in range(200)]
        assert all(1 <= w <= 1 + min(60.0, 0.5 * 2 ** retries) for w in waits)
        assert len(set(waits)) > 100  # jittered, so redelivered chunks do not retry in step
    assert max(_backoff(3) for _ in range(200)) > 3.0  # grows: the cap at 3 retries is 1 + 4 s


def test_only_lost_connections_and_timeouts_are_retried() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

    from workers.tasks import is_transient

    assert is_transient(OperationalError("DELETE", {}, Exception("lock timeout")))
    assert is_transient(RedisConnectionError("gone"))
    assert is_transient(InterfaceError("DELETE", {}, Exception("closed"),
                                       connection_invalidated=True))
    assert not is_transient(InterfaceError("DELETE", {}, Exception("bad")))
    assert not is_transient(IntegrityError("DELETE", {}, Exception("fk")))


def test_memory_registry_ends_a_run_with_a_failed_chunk_as_failed() -> None:
    from workers.runs import MemoryRunRegistry

    reg = MemoryRunRegistry()
    assert reg.acquire("r1", 60) is None
    reg.start("r1", cutoff="c", batch_size=1, source="test")
    reg.add_chunk("r1", 1)
    reg.finish_planning("r1")
    ended = reg.chunk_failed("r1", 1, "chunk 1 failed: boom")
    assert ended is not None and ended.state == "failed" and ended.chunks_failed == 1
    assert reg.active_run() is None
    assert reg.chunk_failed("r1", 1, "again") is None


def test_a_run_left_planning_by_a_dead_coordinator_is_closed_by_the_next_run(db: Db) -> None:
    # A coordinator that died mid-plan: its record says planning, its lock has expired.
    db.registry.start("dead-run", cutoff="2026-01-01T00:00:00+00:00", batch_size=10,
                      source="beat")
    sent, dispatch = collecting(db)
    with capture_logs() as logs:
        summary = coordinator.coordinate(db.settings, db.engine, db.tables, db.registry,
                                         dispatch, source="test")
    dead = db.registry.get("dead-run")
    assert dead is not None and dead.state == "failed" and "abandoned" in dead.error
    assert summary.status == "started" and len(sent) == summary.chunks > 0
    assert [e["run_id"] for e in events(logs, "cleanup_run_abandoned")] == ["dead-run"]


def test_a_stalled_run_has_its_lost_chunks_sent_again_by_the_next_trigger(db: Db) -> None:
    sent, dispatch = collecting(db)
    summary = coordinator.coordinate(db.settings, db.engine, db.tables, db.registry, dispatch,
                                     source="test")
    lost, delivered = sent[1], sent[:1] + sent[2:]  # the broker lost chunk 2's message
    run_chunks(db, delivered)
    assert db.registry.active_run() == summary.run_id

    # Within the stall period the run may still be redelivering: a trigger only reports it.
    early, early_dispatch = collecting(db)
    quiet = coordinator.coordinate(db.settings, db.engine, db.tables, db.registry,
                                   early_dispatch, source="beat")
    assert quiet.status == "skipped" and not early

    later = time.time() + db.settings.stall_after_seconds + 1
    again, again_dispatch = collecting(db)
    with capture_logs() as logs:
        resumed = coordinator.coordinate(db.settings, db.engine, db.tables, db.registry,
                                         again_dispatch, source="beat", clock=lambda: later)
    assert resumed.status == "resumed" and resumed.run_id == summary.run_id
    assert [(s.chunk.number, s.chunk.lo, s.chunk.hi, s.cutoff) for s in again] == [
        (lost.chunk.number, lost.chunk.lo, lost.chunk.hi, lost.cutoff)]
    assert [e["chunks"] for e in events(logs, "cleanup_run_resumed")] == [1]
    # One resume per stall period, not one per trigger.
    repeat = coordinator.coordinate(db.settings, db.engine, db.tables, db.registry,
                                    lambda *a: None, source="beat", clock=lambda: later)
    assert repeat.status == "skipped"

    run_chunks(db, again)
    record = db.registry.get(summary.run_id)
    assert record is not None and record.state == "finished"
    assert record.rows_deleted == EXPIRED and db.registry.active_run() is None
    assert task_state_rows(db.engine, db.tables) == expected_survivors(SPEC)
