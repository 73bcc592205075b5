"""A broker that stops answering mid-run (issue 22, item 8): chunk tasks sending the next
chunks hang on it until the hard time limit ends them, after their DELETE was committed and
counted. Their worker logged `chunk_failed TimeLimitExceeded` at ERROR while the run's
chunks_failed stayed 0. Now every chunk_failed error is a failure the run counted. A private
redis-server is the broker (frozen with SIGSTOP, so connections hang rather than fail); the
run store is the test Redis, which stays up."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.processes import start_worker
from tests.reliability.conftest import Seeder
from tests.reliability.faults import RedisServer
from tests.reliability.pipeline import Pipeline, pipeline_env
from tests.services import REDIS_URL
from workers.seed import SeedSpec

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(180)]


def records(log: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_chunks_cut_short_by_a_frozen_broker_are_not_logged_as_failed(
        pg_url: str, seeded: Seeder, isolation: dict[str, str], redis_server: RedisServer,
        tmp_path: Path) -> None:
    spec = SeedSpec(rows=200_000)
    engine, tables = seeded(spec)
    env = pipeline_env(pg_url, redis_server.url, isolation, cleanup_batch_size=500,
                       run_store_url=REDIS_URL, result_backend=REDIS_URL,
                       chunk_soft_time_limit=3, chunk_time_limit=4, statement_timeout_ms=2000,
                       lock_timeout_ms=1000, visibility_timeout=3600)
    p = Pipeline(env, engine, tables, spec, tmp_path)
    worker = start_worker(env, tmp_path, "a", concurrency=2)
    try:
        with p.client() as app:
            p.trigger(app)
            run_id = p.wait_for_run_id()
            p.wait_for_state(run_id, ("running",))
        while getattr(p.registry.get(run_id), "chunks_done", 0) < 3:
            time.sleep(0.05)  # mid-run: chunks are deleting and sending the next ones
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)  # the broker stops answering
        time.sleep(10)  # past the chunks' hard time limit
        redis_server.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            record = p.registry.get(run_id)
            if record is not None and record.ended:
                break
            time.sleep(0.5)
        time.sleep(1)
        log = worker.log()
    finally:
        if redis_server.proc is not None:
            redis_server.proc.send_signal(signal.SIGCONT)
        worker.stop()
    record = p.registry.get(run_id)
    assert record is not None
    cut_short = [r for r in records(log) if "TimeLimitExceeded" in json.dumps(r)]
    assert cut_short, "the frozen broker cut no chunk short: nothing was reproduced\n" + log[-3000:]
    failed = [r for r in records(log) if r.get("event") == "chunk_failed"
              and r.get("level") == "error"]
    assert len(failed) == record.chunks_failed, (failed, record)
    if record.chunks_failed == 0:  # no chunk failed: no error line says one did
        errors = [r for r in cut_short if r.get("level") == "error"]
        assert errors == [], errors
    assert record.state == "finished", record
