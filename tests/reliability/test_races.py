"""Races with a run in progress: writers refreshing expired keys, overlapping triggers, writers
inserting rows past the planned ranges. Every DELETE re-checks expires_at < cutoff, the lock
admits one run, and a run touches only the id ranges it planned."""

from __future__ import annotations

import datetime as dt
import queue
import random
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert

from tests.processes import WorkerProcess, start_worker, wait_for_run
from tests.reliability.conftest import Scenario, Seeder
from tests.reliability.faults import RedisServer, hold_row_lock, wait_for_lock_waiter
from tests.reliability.pipeline import Counts, Pipeline, counts, pipeline_env
from tests.reliability.writers import (
    Refreshers,
    expected_key_values,
    expired_rows,
    key_values,
    reseed,
)
from tests.services import unique
from workers.chunk import check_chunk_args, run_chunk
from workers.coordinator import coordinate
from workers.db import db_now
from workers.planners import ChunkRange
from workers.runs import registry_for
from workers.seed import SeedSpec, expected_survivors
from workers.settings import Settings
from workers.store import MetastoreStateBackend, TaskScope

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(90)]


def test_refreshed_keys_survive_a_concurrent_run_in_process(
        pg_url: str, seeded: Seeder, redis_url: str, scenario: Scenario) -> None:
    """Coordinator and chunk threads in this process (real PostgreSQL, real Redis run store)
    race writer threads; hypothesis varies batch size, thread counts and who starts first."""
    spec = SeedSpec(rows=6000)
    engine, tables = seeded(spec)
    fresh = [True]

    @settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(batch_size=st.integers(1, 400), chunk_threads=st.integers(1, 4),
           writer_threads=st.integers(1, 3), run_delay_ms=st.integers(0, 300),
           order=st.randoms(use_true_random=False))
    def example(batch_size: int, chunk_threads: int, writer_threads: int, run_delay_ms: int,
                order: random.Random) -> None:
        if fresh:
            fresh.clear()  # the first example runs on the fixture's seed
        else:
            with engine.connect() as conn:
                reseed(engine, tables, spec, db_now(conn))
        settings_ = Settings.from_env({"STATESWEEP_DATABASE_URL": pg_url,
                                       "STATESWEEP_CLEANUP_BATCH_SIZE": str(batch_size)})
        registry = registry_for(redis_url, f"sw:{unique('hyp')}")
        before = counts(engine, tables)
        refreshed = order.sample(expired_rows(spec), 400)
        chunks: queue.Queue[tuple[str, int, ChunkRange, str]] = queue.Queue()
        failures: list[BaseException] = []
        run: list[str] = []

        def dispatch(run_id: str, number: int, rng: ChunkRange, cutoff: str) -> None:
            chunks.put((run_id, number, rng, cutoff))

        def run_over() -> bool:
            record = registry.get(run[0]) if run else None
            return record is not None and record.ended

        def chunk_worker() -> None:
            # Finished chunks send the next ones through dispatch, so a thread stops only once
            # the run has ended and nothing is queued.
            while not (run_over() and chunks.empty()) and not failures:
                try:
                    run_id, number, rng, cutoff = chunks.get(timeout=0.05)
                except queue.Empty:
                    continue
                try:
                    run_chunk(settings_, engine, tables, registry, dispatch,
                              check_chunk_args(run_id, number, rng.kind, rng.lo, rng.hi, cutoff))
                except BaseException as exc:
                    failures.append(exc)

        pool = [threading.Thread(target=chunk_worker) for _ in range(chunk_threads)]
        writers = Refreshers(settings_, engine, tables, refreshed, writer_threads).start()
        try:
            time.sleep(run_delay_ms / 1000)
            summary = coordinate(settings_, engine, tables, registry, dispatch, source="adhoc")
            run.append(summary.run_id)
            for t in pool:
                t.start()
        finally:
            for t in pool:
                if t.is_alive():
                    t.join(60)
            writers.join()
        record = registry.get(summary.run_id)
        after = counts(engine, tables)
        _accumulate(scenario, before, after, refreshed=len(refreshed))
        assert not failures, failures
        assert record is not None and record.state == "finished", record
        assert writers.stale_reads() == []
        assert key_values(engine, tables) == expected_key_values(spec, refreshed)
        assert after.expired == 0

    example()


def _accumulate(scenario: Scenario, before: Counts, after: Counts, refreshed: int) -> None:
    """Sum the counts of every example into the one line this test reports."""
    d = scenario.data
    scenario.note(examples=d.get("examples", 0) + 1,
                  refreshed_keys=d.get("refreshed_keys", 0) + refreshed,
                  expired_before=d.get("expired_before", 0) + before.expired,
                  live_before=d.get("live_before", 0) + before.live,
                  expired_after=d.get("expired_after", 0) + after.expired,
                  live_after=d.get("live_after", 0) + after.live)


def test_refreshed_keys_survive_a_run_on_real_workers(
        pg_url: str, seeded: Seeder, isolation: dict[str, str], redis_server: RedisServer,
        tmp_path: Path, scenario: Scenario) -> None:
    spec = SeedSpec(rows=20_000)
    engine, tables = seeded(spec)
    env = pipeline_env(pg_url, redis_server.url, isolation, cleanup_batch_size=200)
    p = Pipeline(env, engine, tables, spec, tmp_path)
    refreshed = random.Random(7).sample(expired_rows(spec), 2000)
    scenario.before(p.counts())
    started: list[WorkerProcess] = []
    try:
        started += [start_worker(env, tmp_path, "a"), start_worker(env, tmp_path, "b")]
        with p.client() as app:
            writers = Refreshers(p.settings, engine, tables, refreshed, threads=4).start()
            try:
                run_id = p.trigger(app).get(timeout=30)["run_id"]
                record = wait_for_run(env, run_id, timeout=60)
            finally:
                writers.join()
    finally:
        for w in started:
            w.stop()
    after = p.counts()
    overlapping = writers.during(record.started_at, record.finished_at)
    scenario.after(after)
    scenario.note(refreshed_keys=len(refreshed), refreshed_during_run=overlapping,
                  chunks=record.chunks_planned)
    assert record.state == "finished", record
    assert overlapping > 0, "no refresh landed while the run was deleting"
    assert writers.stale_reads() == []
    assert key_values(engine, tables) == expected_key_values(spec, refreshed)
    assert after.expired == 0


def test_overlapping_triggers_make_exactly_one_run(
        pg_url: str, seeded: Seeder, isolation: dict[str, str], redis_server: RedisServer,
        tmp_path: Path, scenario: Scenario) -> None:
    spec = SeedSpec(rows=50_000)
    engine, tables = seeded(spec)
    env = pipeline_env(pg_url, redis_server.url, isolation, cleanup_batch_size=2000,
                       lock_timeout_ms=20_000)
    p = Pipeline(env, engine, tables, spec, tmp_path)
    scenario.before(p.counts())
    started: list[WorkerProcess] = []
    try:
        started += [start_worker(env, tmp_path, "a"), start_worker(env, tmp_path, "b")]
        with p.client() as app:
            # A locked row keeps the run from finishing while the triggers arrive, so a
            # late trigger cannot start a second run legitimately after the first ended.
            with hold_row_lock(engine, tables.task_state.name, 25_001):
                sources = ["beat", "adhoc", "beat", "adhoc", "adhoc"]
                t0 = time.monotonic()
                sent = [p.trigger(app, source=s) for s in sources]
                sent_within = time.monotonic() - t0
                results = [r.get(timeout=30) for r in sent]
                wait_for_lock_waiter(engine)
            runs = [r for r in results if r["status"] in ("started", "finished")]
            assert len(runs) == 1, results
            record = wait_for_run(env, runs[0]["run_id"], timeout=60)
            recorded_runs = p.registry.recent(10)
    finally:
        for w in started:
            w.stop()
    after = p.counts()
    scenario.after(after)
    skipped = [r for r in results if r["status"] == "skipped"]
    scenario.note(triggers=len(sources), runs=len(recorded_runs), skipped=len(skipped),
                  sent_within_s=round(sent_within, 3))
    assert len(skipped) == 4
    assert {r["active_run_id"] for r in skipped} == {runs[0]["run_id"]}
    assert [r.run_id for r in recorded_runs] == [runs[0]["run_id"]]
    assert record.state == "finished"
    assert after.expired == 0
    assert p.rows() == p.survivors()


def test_rows_written_past_the_planned_ranges_are_untouched(
        pg_url: str, seeded: Seeder, isolation: dict[str, str], redis_server: RedisServer,
        tmp_path: Path, scenario: Scenario) -> None:
    spec = SeedSpec(rows=50_000)
    engine, tables = seeded(spec)
    env = pipeline_env(pg_url, redis_server.url, isolation, cleanup_batch_size=1000)
    p = Pipeline(env, engine, tables, spec, tmp_path)
    backend = MetastoreStateBackend(p.settings, engine, tables)
    scope = TaskScope(dag_id="dag_0", run_id="run_0", task_id="late_writer")
    t = tables.task_state
    scenario.before(p.counts())
    started: list[WorkerProcess] = []
    try:
        started.append(start_worker(env, tmp_path, "a"))
        with p.client() as app:
            with hold_row_lock(engine, t.name, 25_001):
                run_id = p.trigger(app).get(timeout=30)["run_id"]
                wait_for_lock_waiter(engine)
                planned = p.registry.get(run_id)
                # Mid-run: live rows through the writer, and rows already expired when written
                # (a backfill, a skewed clock) straight into the table. All get new ids.
                for k in range(500):
                    backend.set(scope, f"live_{k}", f"late_{k}")
                with engine.begin() as conn:
                    now = db_now(conn)
                    conn.execute(insert(t), [
                        {"dag_run_id": 1, "task_id": "backfill", "map_index": -1,
                         "key": f"old_{k}", "dag_id": "dag_0", "run_id": "run_0",
                         "value": f"old_{k}", "updated_at": now,
                         "expires_at": now - dt.timedelta(hours=1)} for k in range(500)])
            record = wait_for_run(env, run_id, timeout=60)
            late = key_values(engine, tables)
            mid = p.counts()
            # The next run plans afresh and takes the late expired rows too.
            second = wait_for_run(env, p.trigger(app).get(timeout=30)["run_id"], timeout=60)
    finally:
        for w in started:
            w.stop()
    after = p.counts()
    scenario.after(after)
    scenario.note(late_live=500, late_expired=500, expired_after_first_run=mid.expired,
                  second_run_rows=second.rows_deleted)
    assert planned is not None and planned.state == "running"
    assert record.state == "finished" and second.state == "finished"
    assert all(late.get(f"live_{k}") == f"late_{k}" for k in range(500))
    # Rows written already expired after the cutoff was fixed are eligible (expires_at <
    # cutoff): the open-ended last block range takes those on appended pages, the next run
    # the rest (those that landed in free space of ranges already done). Never both.
    assert 0 <= mid.expired <= 500
    assert sum(1 for k in range(500) if f"old_{k}" in late) == mid.expired
    assert record.rows_deleted + second.rows_deleted == scenario.data["expired_before"] + 500
    assert second.rows_deleted == mid.expired
    assert after.expired == 0
    final = key_values(engine, tables)
    assert {k: v for k, v in final.items() if k.startswith("key_")} == {
        f"key_{i - 1}": v for i, v in expected_survivors(spec)}
    assert sum(1 for k in final if k.startswith("live_")) == 500
