"""Idle components log nothing at INFO (issue 22, item 8): beat sends the pump every few seconds
whether or not a run is active, and Celery logged each one three times (beat "Sending due
task", the worker's "received" and "succeeded"), ~720 lines an hour. A real beat and worker,
idle for several pumps: the pumps ran (the worker's own count), and neither log says so."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import pytest

from tests.acceptance.test_pipeline import Pipeline, beat, wait_until
from tests.processes import workers
from workers.celery_app import PUMP

pytestmark = pytest.mark.acceptance

PUMPS = 5


def pumps_run(p: Pipeline) -> int:
    """The pumps this test's worker ran (its own count; other tests' workers share the broker
    and are not asked)."""
    me = f"w1@{socket.gethostname()}"
    stats = p.client.control.inspect(timeout=2, destination=[me]).stats() or {}
    return int(stats.get(me, {}).get("total", {}).get(PUMP, 0))


def test_an_idle_worker_and_beat_log_nothing_about_the_pump(
        make_pipeline: Callable[..., Pipeline]) -> None:
    p = make_pipeline(rows=1_000, pump_interval_seconds="1", coordinator_schedule="3600",
                      orphan_schedule="3600", log_level="INFO")
    with workers(p.env, p.log_dir, count=1, concurrency=1) as [worker]:
        with beat(p.env, p.log_dir) as beat_process:
            wait_until(lambda: pumps_run(p) >= PUMPS, 60, f"{PUMPS} pumps")
            time.sleep(1)  # the last pump's lines, had there been any, are written
            beat_log = beat_process.log()
        worker_log = worker.log()
    assert p.registry.active_run() is None  # idle: no run all along
    records = [json.loads(line) for line in (worker_log + beat_log).splitlines()
               if line.startswith("{")]  # log records; the start-up banners list the tasks
    assert [r for r in records if PUMP in json.dumps(r)] == []
    # The logs are there and at INFO: the worker said it was ready, beat that it started.
    events = [r["event"] for r in records if r["level"] == "info"]
    assert any("ready." in e for e in events) and any("beat: Starting" in e for e in events)
