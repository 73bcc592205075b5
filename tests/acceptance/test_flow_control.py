"""Flow control on real workers: pause and resume sent as tasks (as Flower's API and `celery
call` send them), a run-time budget running out mid-run, and replica lag on a real streaming
standby. Each run finishes later with the full-set comparison: every expired row gone, every
live row kept, nothing re-planned (one run id, its chunks counted once).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

from tests.acceptance.test_pipeline import (
    Pipeline,
    json_events,
    named,
    running,
    wait_until,
)
from tests.processes import wait_for_run
from workers.celery_app import PAUSE, RESUME

pytestmark = pytest.mark.acceptance


def _settled(p: Pipeline, run_id: str, quiet: float = 1.5, timeout: float = 30) -> int:
    """chunks_done once it has not moved for *quiet* seconds (the running chunks finished)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        record = p.registry.get(run_id)
        assert record is not None
        if record.chunks_done != last:
            last, since = record.chunks_done, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return last
        time.sleep(0.1)
    raise TimeoutError(f"run {run_id} never settled")


def test_pause_mid_run_holds_every_chunk_and_resume_finishes_the_same_run(
        make_pipeline: Callable[..., Pipeline]) -> None:
    # 5 chunks a second for all workers: the run lasts long enough to pause it mid-way.
    p = make_pipeline(rows=20_000, batch=500, chunk_rate_limit="5/s", max_chunks_in_flight="4")
    with running(p.env, p.log_dir, "w", concurrency=2) as worker:
        run_id = p.trigger().get(timeout=60)["run_id"]
        wait_until(lambda: (r := p.registry.get(run_id)) and r.chunks_done >= 3, 30,
                   "three chunks")
        paused = p.client.send_task(PAUSE, kwargs={"reason": "incident 42", "by": "test"},
                                    queue=p.settings.control_queue).get(timeout=30)
        at_pause = _settled(p, run_id)
        time.sleep(2)  # held: nothing may move in this time
        held = p.registry.get(run_id)
        trigger = p.trigger().get(timeout=30)
        p.client.send_task(RESUME, kwargs={"by": "test"},
                           queue=p.settings.control_queue).get(timeout=30)
        record = wait_for_run(p.env, run_id, timeout=90)
        events = _every_chunk_logged(worker, record.chunks_planned)
    assert (paused["by"], paused["reason"]) == ("test", "incident 42")
    assert held is not None and (held.state, held.held) == ("running", "paused")
    assert held.chunks_done == at_pause < held.chunks_planned
    assert trigger["status"] == "paused" and trigger["active_run_id"] == run_id
    assert (record.state, record.chunks_done) == ("finished", record.chunks_planned)
    assert record.rows_deleted == p.counts.expired
    counted = sorted(e["chunk"] for e in named(events, "chunk_deleted") if e["counted"])
    assert counted == list(range(1, record.chunks_planned + 1))  # nothing re-planned or lost
    assert named(events, "cleanup_run_held")  # the hold was logged
    assert p.registry.paused() is None and p.registry.active_run() is None
    p.assert_exactly_expired_rows_gone()


def test_a_run_over_its_time_budget_stops_sending_and_the_next_trigger_continues_it(
        make_pipeline: Callable[..., Pipeline]) -> None:
    p = make_pipeline(rows=20_000, batch=500, chunk_rate_limit="4/s", max_chunks_in_flight="2",
                      max_run_seconds="2")
    with running(p.env, p.log_dir, "w", concurrency=2):
        run_id = p.trigger().get(timeout=60)["run_id"]
        at_budget = _settled(p, run_id, timeout=60)
        held = p.registry.get(run_id)
        budgets = 1
        while (record := p.registry.get(run_id)) is not None and not record.ended:
            again = p.trigger().get(timeout=30)  # beat's next trigger: a new budget
            assert again["active_run_id"] == run_id
            budgets += 1
            _settled(p, run_id, timeout=60)
            assert budgets < 30, record
        record = wait_for_run(p.env, run_id, timeout=30)
    assert held is not None and held.held == "max_run_seconds"
    assert 0 < at_budget < record.chunks_planned
    assert budgets >= 2
    assert (record.state, record.chunks_done, record.rows_deleted) == (
        "finished", record.chunks_planned, p.counts.expired)
    assert record.holds >= 1
    p.assert_exactly_expired_rows_gone()


def test_no_chunk_starts_while_the_standby_lags_and_the_run_finishes_after_it_catches_up(
        standby: Any, make_pipeline: Callable[..., Pipeline]) -> None:
    url = standby.create_database("flow")
    p = make_pipeline(rows=20_000, batch=500, chunk_rate_limit="6/s", max_chunks_in_flight="3",
                      max_replica_lag_seconds="1", database_url=url)
    limit = 1.0
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample_lag() -> None:
        from workers.flow.lag import replica_lag_seconds

        engine = standby.primary_engine("flow")
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            while not stop.is_set():
                lag = replica_lag_seconds(conn, settle_seconds=0) or 0.0
                samples.append((time.time(), lag))
                time.sleep(0.1)
        engine.dispose()

    sampler = threading.Thread(target=sample_lag, daemon=True)
    writer = standby.primary_engine("flow")
    with running(p.env, p.log_dir, "w", concurrency=2) as worker:
        sampler.start()
        run_id = p.trigger().get(timeout=60)["run_id"]
        wait_until(lambda: (r := p.registry.get(run_id)) and r.chunks_done >= 3, 30,
                   "three chunks")
        standby.pause_replay()
        # Writes the standby cannot replay: its lag grows past the limit.
        for n in range(12):
            with writer.begin() as conn:
                conn.execute(text("CREATE TABLE IF NOT EXISTS lagging (n int)"))
                conn.execute(text("INSERT INTO lagging VALUES (:n)"), {"n": n})
            time.sleep(0.5)
        held = p.registry.get(run_id)
        standby.resume_replay()
        record = wait_for_run(p.env, run_id, timeout=120)
        stop.set()
        sampler.join(10)
        events = _every_chunk_logged(worker, record.chunks_planned)
    writer.dispose()
    assert held is not None and held.held.startswith("replica lag"), held
    assert (record.state, record.rows_deleted) == ("finished", p.counts.expired)
    # From the run's own chunk log: no chunk's DELETE began while the standby was clearly
    # over the limit (two consecutive samples above twice the limit bracket the moment).
    over = [(a[0], b[0]) for a, b in zip(samples, samples[1:], strict=False)
            if a[1] > 2 * limit and b[1] > 2 * limit]
    assert over, "the standby never lagged: the test proved nothing"
    starts = [_iso(e["timestamp"]) - e["ms"] / 1000 for e in named(events, "chunk_deleted")]
    inside = [s for s in starts for lo, hi in over if lo <= s <= hi]
    assert inside == [], (inside, over)
    assert named(events, "cleanup_run_held")
    p.assert_exactly_expired_rows_gone()


def _every_chunk_logged(worker: Any, chunks: int) -> list[dict[str, Any]]:
    """The worker's log events once it holds a counted chunk_deleted line for each chunk: the
    run store says finished the moment the last chunk is counted, a moment before that chunk's
    line is written."""
    def logged() -> list[dict[str, Any]] | None:
        events = json_events(worker)
        counted = {e["chunk"] for e in named(events, "chunk_deleted") if e["counted"]}
        return events if len(counted) >= chunks else None

    return wait_until(logged, 30, "a counted chunk_deleted line for every chunk")


def _iso(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
