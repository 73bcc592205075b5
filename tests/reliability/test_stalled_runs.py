"""A worker SIGKILLed mid-run with no replacement: `status` reports the run as stalled (time
since the last finished chunk, the outstanding chunks and when each is re-sent), `abort` ends it
and frees the lock, and the next trigger plans a new run that leaves no expired row behind."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.processes import ROOT, WorkerProcess, child_env, start_worker
from tests.reliability.conftest import Scenario, Seeder
from tests.reliability.faults import RedisServer, hold_row_lock, wait_for_lock_waiter
from tests.reliability.pipeline import Pipeline, pipeline_env
from workers.cli import EXIT_OK
from workers.seed import SeedSpec
from workers.window import resend_after

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(120)]

STATESWEEP = str(Path(sys.executable).with_name("statesweep"))


def statesweep(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STATESWEEP, *args], env=child_env(env), cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def status_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = statesweep(env, "status", *args, "--format", "json")
    assert done.returncode == EXIT_OK, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_a_sigkilled_workers_run_is_reported_stalled_and_abort_frees_the_lock(
        pg_url: str, seeded: Seeder, isolation: dict[str, str], redis_server: RedisServer,
        tmp_path: Path, scenario: Scenario) -> None:
    spec = SeedSpec(rows=100_000)
    engine, tables = seeded(spec)
    # A short hard limit: a run with no finished chunk for that long is stalled (a chunk cannot
    # run longer), so the test sees it in seconds. No beat, so nothing re-sends the chunks.
    env = pipeline_env(pg_url, redis_server.url, isolation, cleanup_batch_size=5000,
                       visibility_timeout=60, chunk_time_limit=4, chunk_soft_time_limit=3,
                       lock_ttl_seconds=59, statement_timeout_ms=2500)
    p = Pipeline(env, engine, tables, spec, tmp_path)
    scenario.before(p.counts())
    started: list[WorkerProcess] = []
    try:
        started.append(start_worker(env, tmp_path, "a"))
        # The chunk holding row 50_001 waits on this lock: the worker is mid-DELETE when killed.
        with p.client() as app, hold_row_lock(engine, tables.task_state.name, 50_001):
            p.trigger(app)
            run_id = p.wait_for_run_id()
            p.wait_for_state(run_id, ("running",))
            wait_for_lock_waiter(engine)
            started[0].kill()
        deadline = time.monotonic() + 60
        while True:
            data = status_json(env, run_id)
            if data["condition"]["stalled"]:
                break
            assert time.monotonic() < deadline, f"never reported stalled: {data}"
            time.sleep(0.5)
        now = data["condition"]
        assert data["state"] == "running" and data["chunks_done"] < data["estimated_chunks"]
        assert now["idle_seconds"] >= 4 and now["outstanding"]
        again = resend_after(p.settings)
        for chunk in now["outstanding"]:
            assert chunk["state"] == "sent"
            gap = (dt.datetime.fromisoformat(chunk["resend_at"])
                   - dt.datetime.fromisoformat(chunk["sent_at"])).total_seconds()
            assert gap == pytest.approx(again)
        text = statesweep(env, "status").stdout
        assert f"active run: {run_id}" in text and "STALLED: no chunk finished for" in text
        detail = statesweep(env, "status", run_id).stdout
        assert "re-sent by the first pump after" in detail

        aborted = statesweep(env, "abort", run_id)
        assert aborted.returncode == EXIT_OK, aborted.stderr
        assert f"run {run_id} aborted" in aborted.stdout
        assert p.registry.active_run() is None
        assert p.registry.get(run_id).state == "aborted"  # type: ignore[union-attr]

        # A new worker and the next trigger: a new run over what is left; the aborted run's
        # redelivered chunks delete nothing.
        started.append(start_worker(env, tmp_path, "b"))
        done = statesweep(env, "cleanup", "--wait", "--format", "json")
        assert done.returncode == EXIT_OK, done.stderr
        record = json.loads(done.stdout)
    finally:
        for w in started:
            w.stop()
    after = p.counts()
    scenario.after(after)
    scenario.note(aborted_run=run_id, outstanding_at_abort=len(now["outstanding"]),
                  chunks_done_at_abort=data["chunks_done"])
    assert record["run_id"] != run_id and record["state"] == "finished"
    assert after.expired == 0
    assert p.rows() == p.survivors()
