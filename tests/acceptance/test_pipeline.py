"""The distributed pipeline with real parts: ``celery -A workers worker`` (and ``beat``)
subprocesses on a fresh PostgreSQL database and the test Redis as broker, result backend and
run store. Each test has its own database, Redis key prefix and queue names.

Workers log JSON lines (STATESWEEP_LOG_FORMAT=json); the tests read them to see which worker
ran which chunk, and check that every statesweep event carries task name, task id and run id.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult
from sqlalchemy import Engine, inspect, select

from tests.brokers import BROKERS, Broker
from tests.conftest import create_schema, database_now
from tests.processes import (
    CELERY,
    ROOT,
    WorkerProcess,
    child_env,
    start_worker,
    wait_for_run,
    workers,
)
from tests.services import REDIS_URL
from workers.celery_app import COORDINATE, DELETE_CHUNK, SWEEP_ORPHANS, build_app
from workers.runs import RunRecord, RunRegistry, registry_for
from workers.schema import Tables
from workers.seed import (
    ROWS_PER_RUN,
    SeedCounts,
    SeedSpec,
    asset_state_rows,
    expected_live_asset_state,
    expected_survivors,
    kind_of,
    seed,
    task_state_rows,
)
from workers.settings import Settings
from workers.store import MetastoreStateBackend, TaskScope

pytestmark = pytest.mark.acceptance

T = TypeVar("T")


@dataclass
class Pipeline:
    env: dict[str, str]
    settings: Settings
    client: Celery
    engine: Engine
    tables: Tables
    spec: SeedSpec
    counts: SeedCounts
    log_dir: Path
    broker: Broker

    @property
    def registry(self) -> RunRegistry:
        return registry_for(REDIS_URL, self.settings.key_prefix)

    def trigger(self, **kwargs: Any) -> AsyncResult:
        """What the CLI and Flower do: send the coordinator by name to the control queue."""
        return self.client.send_task(COORDINATE, kwargs={"source": "test", **kwargs},
                                     queue=self.settings.control_queue)

    def sweep_orphans(self) -> AsyncResult:
        return self.client.send_task(SWEEP_ORPHANS, queue=self.settings.control_queue)

    def queued(self, queue: str) -> int:
        return self.broker.ready(queue)

    def assert_exactly_expired_rows_gone(self) -> None:
        assert task_state_rows(self.engine, self.tables) == expected_survivors(self.spec)


@pytest.fixture
def make_pipeline(pg_url: str, redis_url: str, isolation: dict[str, str], tmp_path: Path,
                  broker: Broker) -> Iterator[Callable[..., Pipeline]]:
    """Builds the test's pipeline: schema in *naming*, seeded rows, worker environment."""
    made: list[Pipeline] = []

    def build(*, naming: str = "seed", rows: int = 20_000, batch: int = 1_000,
              database_url: str | None = None, **extra: str) -> Pipeline:
        url = database_url or pg_url
        engine, tables = create_schema(url, naming)
        spec = SeedSpec(rows=rows)
        counts = seed(engine, tables, spec, database_now(engine))
        env = {
            "STATESWEEP_DATABASE_URL": url,
            "STATESWEEP_BROKER_URL": broker.url,
            "STATESWEEP_RESULT_BACKEND": redis_url,
            "STATESWEEP_RUN_STORE_URL": redis_url,
            "STATESWEEP_CLEANUP_BATCH_SIZE": str(batch),
            "STATESWEEP_LOG_FORMAT": "json",
            **isolation,
            **{f"STATESWEEP_{k.upper()}": v for k, v in extra.items()},
        }
        settings = Settings.from_env(env)
        p = Pipeline(env, settings, build_app(settings, include_tasks=False), engine, tables,
                     spec, counts, tmp_path, broker)
        made.append(p)
        return p

    yield build
    for p in made:
        p.client.close()
        p.engine.dispose()
    queues = [isolation["STATESWEEP_CONTROL_QUEUE"], isolation["STATESWEEP_CHUNK_QUEUE"]]
    with redis.Redis.from_url(REDIS_URL) as r:
        keys = list(r.scan_iter(match=f"{isolation['STATESWEEP_KEY_PREFIX']}:*"))
        keys += queues + [f"_kombu.binding.{q}" for q in queues]
        r.delete(*keys)


# --- helpers ------------------------------------------------------------------------------------


def json_events(worker: WorkerProcess) -> list[dict[str, Any]]:
    """The worker's JSON log lines (the Celery banner is plain text and skipped)."""
    return [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


def wait_until(check: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not happen in {timeout}s")


@contextmanager
def running(env: dict[str, str], log_dir: Path, name: str, **kwargs: Any
            ) -> Iterator[WorkerProcess]:
    worker = start_worker(env, log_dir, name, **kwargs)
    try:
        yield worker
    finally:
        worker.stop()


@contextmanager
def beat(env: dict[str, str], log_dir: Path) -> Iterator[WorkerProcess]:
    """``celery -A workers beat`` with its schedule file in the test's directory."""
    log_path = log_dir / "beat.log"
    cmd = [CELERY, "-A", "workers", "beat", "-s", str(log_dir / "beat-schedule"),
           "--max-interval", "1"]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(env), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    process = WorkerProcess("beat", proc, log_path)
    try:
        yield process
    finally:
        process.stop()


def schema_snapshot(engine: Engine) -> dict[str, Any]:
    insp = inspect(engine)
    return {t: (sorted(c["name"] for c in insp.get_columns(t)),
                sorted(str(i["name"]) for i in insp.get_indexes(t)))
            for t in sorted(insp.get_table_names())}


def refresh(p: Pipeline, row_ids: list[int]) -> set[tuple[int, str]]:
    """Upsert these seeded rows through the state-store writer, as a running task would: new
    value, expires_at pushed to now + retention. Returns their (id, value) after the refresh."""
    backend = MetastoreStateBackend(p.settings, p.engine, p.tables)
    for row_id in row_ids:
        i = row_id - 1
        run = i // ROWS_PER_RUN
        scope = TaskScope(f"dag_{run % 50}", f"run_{run}", f"task_{(i // 10) % 10}")
        backend.set(scope, f"key_{i}", f"refreshed_{i}")
    return {(row_id, f"refreshed_{row_id - 1}") for row_id in row_ids}


# --- 1 and 7: the whole pipeline on two workers, in both namings -------------------------------


# Each planner, each naming and each broker at least once, and blocks (the backlog's plan) on
# both brokers: the broker carries the same messages whatever the planner cut.
@pytest.mark.parametrize(("naming", "planner", "broker"), [
    ("seed", "blocks", "redis"), ("seed", "blocks", "rabbitmq"), ("airflow", "blocks", "redis"),
    ("seed", "walk", "rabbitmq"), ("airflow", "expiry", "redis")], indirect=["broker"])
def test_two_workers_delete_exactly_expired_and_orphaned_rows(
        naming: str, planner: str, make_pipeline: Callable[..., Pipeline]) -> None:
    batch = 2_000
    p = make_pipeline(naming=naming, rows=200_000, batch=batch, planner=planner)
    expired = p.counts.expired
    schema_before = schema_snapshot(p.engine)

    with workers(p.env, p.log_dir, count=2, concurrency=2) as (w1, w2):
        summary = p.trigger().get(timeout=60)
        run_id = summary["run_id"]
        record = wait_for_run(p.env, run_id, timeout=90)
        orphans = p.sweep_orphans().get(timeout=60)

    window = p.settings.max_chunks_in_flight
    assert (summary["status"], summary["planner"]) == ("started", planner)
    assert 0 < summary["chunks"] <= window  # the first window, not the whole run
    chunks = record.chunks_planned
    assert (record.state, record.planner, record.chunks_done, record.rows_deleted) == (
        "finished", planner, chunks, expired)
    assert chunks >= expired // batch
    assert orphans["rows"] == p.counts.asset_rows_orphaned > 0
    # Full sets: every expired row and orphaned asset row is gone, every other row intact.
    p.assert_exactly_expired_rows_gone()
    assert asset_state_rows(p.engine, p.tables) == expected_live_asset_state(p.spec)
    assert schema_snapshot(p.engine) == schema_before  # no schema was altered

    # Which worker ran which chunk, from each worker's own log.
    by_worker = {w.name: named(json_events(w), "chunk_deleted") for w in (w1, w2)}
    assert by_worker["w1"] and by_worker["w2"], {k: len(v) for k, v in by_worker.items()}
    deleted = by_worker["w1"] + by_worker["w2"]
    assert sorted(e["chunk"] for e in deleted if e["counted"]) == list(range(1, chunks + 1))
    # A walk chunk holds exactly batch expired rows, an expiry chunk at most that many; a
    # block range is sized from the measured density to hold about that many.
    limit = batch if planner in ("walk", "expiry") else int(batch * 1.5)
    assert all(0 <= e["rows"] <= limit for e in deleted), max(e["rows"] for e in deleted)
    assert sum(e["rows"] for e in deleted) == expired
    assert all(e["kind"] == planner for e in deleted)

    if p.broker.is_amqp:
        # Quorum queues refuse a global QoS; Celery saw them and set a per-consumer prefetch.
        assert all("Global QoS is disabled" in w.log() for w in (w1, w2))

    # JSON logs: every statesweep event carries the task name, task id and run id.
    events = json_events(w1) + json_events(w2)
    ours = [e for e in events if e["logger"].startswith("statesweep.")]
    assert ours and all(e.get("task_name") and e.get("task_id") and e.get("run_id")
                        for e in ours), [e for e in ours if not e.get("run_id")][:3]
    assert {e["task_name"] for e in named(events, "chunk_deleted")} == {DELETE_CHUNK}
    [started] = named(events, "cleanup_run_started")
    assert (started["task_name"], started["run_id"]) == (COORDINATE, run_id)
    [finished] = named(events, "cleanup_run_finished")
    assert (finished["run_id"], finished["rows"], finished["chunks"]) == (run_id, expired, chunks)
    # Only the window was ever in flight: the coordinator sent it, finished chunks sent the rest.
    [dispatched] = named(events, "cleanup_run_dispatched")
    assert dispatched["chunks"] == summary["chunks"]
    assert finished["duration"] > 0 and finished["rows_per_second"] > 0
    [swept] = named(events, "orphaned_asset_state_swept")
    assert swept["task_name"] == SWEEP_ORPHANS and swept["rows"] == orphans["rows"]


# --- 2: a row refreshed after planning, before its chunk runs, survives ------------------------


def test_rows_refreshed_after_planning_survive(make_pipeline: Callable[..., Pipeline]) -> None:
    p = make_pipeline(rows=20_000, batch=1_000)
    expired = p.counts.expired
    # Only the control queue is consumed: the run is planned, its chunks wait in the broker.
    with running(p.env, p.log_dir, "control", queues=p.settings.control_queue, concurrency=1):
        summary = p.trigger().get(timeout=60)
    assert summary["status"] == "started"
    planned = p.registry.get(summary["run_id"])
    assert planned is not None
    assert planned.chunks_done == 0
    assert p.queued(p.settings.chunk_queue) == summary["chunks"] == planned.chunks_planned

    expired_ids = [i + 1 for i in range(p.spec.rows) if kind_of(i, p.spec) == "expired"]
    refreshed = refresh(p, expired_ids[::400])  # 28 rows spread over every chunk

    with running(p.env, p.log_dir, "chunks", queues=p.settings.chunk_queue, concurrency=2):
        record = wait_for_run(p.env, summary["run_id"], timeout=60)
    assert (record.state, record.rows_deleted) == ("finished", expired - len(refreshed))
    assert task_state_rows(p.engine, p.tables) == expected_survivors(p.spec) | refreshed


# --- 3: overlapping triggers make one run -------------------------------------------------------


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_three_overlapping_triggers_make_exactly_one_run(
        make_pipeline: Callable[..., Pipeline]) -> None:
    p = make_pipeline(rows=20_000, batch=1_000)
    # Three coordinator processes take the triggers at once; no chunk runs until all three
    # answered, so the run that won stays active the whole time.
    with running(p.env, p.log_dir, "control", queues=p.settings.control_queue,
                 concurrency=3) as control:
        results = [p.trigger(source=f"trigger-{n}") for n in range(3)]
        summaries = [r.get(timeout=60) for r in results]
    [winner] = [s for s in summaries if s["status"] == "started"]
    skipped = [s for s in summaries if s["status"] == "skipped"]
    run_id = winner["run_id"]
    assert len(skipped) == 2
    assert all(s["active_run_id"] == run_id and s["chunks"] == 0 for s in skipped)
    assert [r.run_id for r in p.registry.recent()] == [run_id]
    logged = named(json_events(control), "coordinator_skipped_active_run")
    assert sorted(e["run_id"] for e in logged) == sorted(s["run_id"] for s in skipped)
    assert {e["active_run_id"] for e in logged} == {run_id}
    assert p.queued(p.settings.chunk_queue) == winner["chunks"] > 0
    if p.broker.is_amqp:
        declared = p.broker.queue_declarations()
        for queue in (p.settings.control_queue, p.settings.chunk_queue):
            # Durable quorum queues with a delivery limit, as workers/brokers.py declares them.
            assert declared[queue].startswith("quorum true"), declared[queue]
            assert '"x-delivery-limit",10' in declared[queue], declared[queue]

    with running(p.env, p.log_dir, "chunks", queues=p.settings.chunk_queue, concurrency=2):
        record = wait_for_run(p.env, run_id, timeout=60)
    assert (record.state, record.rows_deleted) == ("finished", p.counts.expired)
    p.assert_exactly_expired_rows_gone()


# --- 4: batch size 0 is one chunk ---------------------------------------------------------------


def test_batch_size_zero_deletes_everything_in_one_chunk(
        make_pipeline: Callable[..., Pipeline]) -> None:
    p = make_pipeline(rows=20_000, batch=0)  # STATESWEEP_CLEANUP_BATCH_SIZE=0
    with workers(p.env, p.log_dir, count=1, concurrency=2) as (worker,):
        summary = p.trigger().get(timeout=60)
        record = wait_for_run(p.env, summary["run_id"], timeout=60)
    assert summary["chunks"] == 1
    assert (record.state, record.batch_size, record.chunks_planned, record.chunks_done,
            record.rows_deleted) == ("finished", 0, 1, 1, p.counts.expired)
    [chunk] = named(json_events(worker), "chunk_deleted")
    assert (chunk["chunk"], chunk["rows"]) == (1, p.counts.expired)
    p.assert_exactly_expired_rows_gone()


# --- 5: beat really triggers --------------------------------------------------------------------


def test_beat_triggers_the_coordinator_and_the_orphan_sweep(
        make_pipeline: Callable[..., Pipeline]) -> None:
    p = make_pipeline(rows=20_000, batch=2_000, coordinator_schedule="1", orphan_schedule="1")
    live = expected_live_asset_state(p.spec)

    coordinator_sent = "Sending due task statesweep-cleanup-task-state"

    with workers(p.env, p.log_dir, count=1, concurrency=2):
        with beat(p.env, p.log_dir) as scheduler:

            def beat_fired_twice_and_a_run_finished() -> list[RunRecord]:
                runs = [r for r in p.registry.recent(50) if r.state == "finished"]
                fired = scheduler.log().count(coordinator_sent)
                done = fired >= 2 and asset_state_rows(p.engine, p.tables) == live
                return runs if runs and done else []

            wait_until(beat_fired_twice_and_a_run_finished, 45, "a beat-triggered run")
        # Beat is stopped; let what it already sent drain before the worker stops.
        wait_until(lambda: p.queued(p.settings.control_queue) == 0
                   and p.registry.active_run() is None, 30, "the last beat trigger")

    runs = sorted(p.registry.recent(50), key=lambda r: r.started_at)
    assert runs and all((r.source, r.state) == ("beat", "finished") for r in runs)
    # Beat's runs are named as the CLI names its own (one format of run id).
    assert all(re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", r.run_id) for r in runs), runs
    assert runs[0].rows_deleted == p.counts.expired
    assert sum(r.rows_deleted for r in runs) == p.counts.expired
    # Single flight across beat's triggers: no two runs were ever active at once.
    assert all(a.finished_at <= b.started_at for a, b in zip(runs, runs[1:], strict=False))
    log = scheduler.log()
    assert log.count(coordinator_sent) >= 2
    assert "Sending due task statesweep-sweep-orphaned-asset-state" in log
    p.assert_exactly_expired_rows_gone()
    assert asset_state_rows(p.engine, p.tables) == live


# --- a chunk that meets a lock retries with backoff and finishes --------------------------------


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_chunk_blocked_by_a_writer_retries_and_finishes(
        make_pipeline: Callable[..., Pipeline]) -> None:
    p = make_pipeline(rows=20_000, batch=1_000, lock_timeout_ms="200")
    t = p.tables.task_state
    first_expired = min(i + 1 for i in range(p.spec.rows) if kind_of(i, p.spec) == "expired")
    writer = p.engine.connect()
    held = writer.begin()
    try:
        # A writer holds chunk 1's first row: the chunk's DELETE hits lock_timeout and retries.
        writer.execute(select(t.c.id).where(t.c.id == first_expired).with_for_update())
        with workers(p.env, p.log_dir, count=1, concurrency=2) as (worker,):
            summary = p.trigger().get(timeout=60)
            retry = wait_until(lambda: named(json_events(worker), "chunk_retry"), 30,
                               "a chunk retry")[0]
            held.commit()
            record = wait_for_run(p.env, summary["run_id"], timeout=60)
    finally:
        if held.is_active:
            held.rollback()
        writer.close()
    assert (retry["chunk"], retry["error"], retry["task_name"]) == (1, "OperationalError",
                                                                    DELETE_CHUNK)
    # The retry is the same task (same id) finishing later; the run counts its rows once.
    [done] = [e for e in named(json_events(worker), "chunk_deleted") if e["chunk"] == 1]
    assert done["task_id"] == retry["task_id"] and done["counted"]
    assert (record.state, record.chunks_done, record.rows_deleted) == (
        "finished", record.chunks_planned, p.counts.expired)
    p.assert_exactly_expired_rows_gone()
