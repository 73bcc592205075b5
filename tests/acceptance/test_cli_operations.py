"""What `status` reports of orphan sweeps and failed triggers, recorded by a real
``celery -A workers worker`` on PostgreSQL and Redis, and the CLI run as the console script."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest
from sqlalchemy import text

from tests.acceptance.test_cli_worker import ROWS, Deployment, readme_command
from tests.processes import CELERY, ROOT, child_env
from tests.services import REDIS_URL
from workers.cli import EXIT_FAILURE, EXIT_OK
from workers.runs import RunStore, registry_for

pytestmark = pytest.mark.acceptance


def store_of(deployment: Deployment) -> RunStore:
    return registry_for(REDIS_URL, deployment.env["STATESWEEP_KEY_PREFIX"])


def wait_for_sweep(store: RunStore, sweep_id: str, states: tuple[str, ...],
                   timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    sweep = None
    while time.monotonic() < deadline:
        sweep = store.get_sweep(sweep_id)
        if sweep is not None and sweep["state"] in states:
            return sweep
        time.sleep(0.2)
    raise TimeoutError(f"sweep {sweep_id} not in {states} within {timeout}s: {sweep}")


def test_an_orphan_sweep_is_recorded_and_status_finds_it_by_the_printed_task_id(
        deployment: Deployment) -> None:
    sent = deployment.statesweep("orphans")
    assert sent.returncode == EXIT_OK, sent.stderr
    task_id = sent.stdout.strip()
    sweep = wait_for_sweep(store_of(deployment), f"orphans-{task_id}", ("finished",))
    assert sweep["rows"] == deployment.counts.asset_rows_orphaned and sweep["batches"] >= 1

    for given in (task_id, f"orphans-{task_id}"):
        shown = deployment.statesweep("status", given, "--format", "json")
        assert shown.returncode == EXIT_OK, shown.stderr
        data = json.loads(shown.stdout)
        assert data["state"] == "finished" and data["rows"] == deployment.counts.asset_rows_orphaned
        assert data["started_at"].endswith("+00:00")
    overview = json.loads(deployment.statesweep("status", "--format", "json").stdout)
    assert [s["sweep_id"] for s in overview["sweeps"]] == [f"orphans-{task_id}"]


def test_a_failed_trigger_and_a_failed_sweep_are_listed_by_status(deployment: Deployment) -> None:
    """The worker started against a sound database; then the tables lost a column each (an
    operator's mistake, a bad migration): the coordinator and the sweep fail, and say so."""
    with deployment.engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE {deployment.tables.task_state.name} "
                          "DROP COLUMN expires_at"))
        conn.execute(text("ALTER TABLE asset_active RENAME COLUMN uri TO uri_renamed"))
    run = deployment.statesweep("cleanup", "--wait")
    assert run.returncode == EXIT_FAILURE, run.stderr
    assert "expires_at" in run.stderr and "Traceback" not in run.stderr
    run_id = run.stderr.split("dispatched run ")[1].split()[0]

    sent = deployment.statesweep("orphans")
    task_id = sent.stdout.strip()
    sweep = wait_for_sweep(store_of(deployment), f"orphans-{task_id}", ("failed",))
    assert "uri" in sweep["error"]

    overview = deployment.statesweep("status", "--format", "json")
    data = json.loads(overview.stdout)
    assert [t["run_id"] for t in data["failed_triggers"]] == [run_id]
    assert "expires_at" in data["failed_triggers"][0]["error"]
    assert data["runs"][0]["run_id"] == run_id and data["runs"][0]["state"] == "failed"
    assert data["sweeps"][0]["state"] == "failed"
    shown = deployment.statesweep("status")
    assert "failed triggers (newest first):" in shown.stdout and run_id in shown.stdout
    assert f"orphans-{task_id}  failed" in shown.stdout
    assert deployment.rows() == ROWS


def test_readme_celery_call_forms_pause_and_resume_through_a_worker(
        deployment: Deployment) -> None:
    store = store_of(deployment)

    def call(prefix: str) -> None:
        argv = [CELERY if a == "celery" else a for a in readme_command(prefix)]
        called = subprocess.run(argv, env=child_env(deployment.env), cwd=ROOT,
                                capture_output=True, text=True, timeout=60, check=False)
        assert called.returncode == 0, called.stderr

    call("celery -A workers call statesweep.pause")
    deadline = time.monotonic() + 60
    while store.paused() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    paused = store.paused()
    assert paused is not None and paused.reason == "incident" and paused.by == "celery"
    assert 0 < paused.until - paused.at <= 600
    shown = deployment.statesweep("status")
    assert "PAUSED by celery" in shown.stdout

    call("celery -A workers call statesweep.resume")
    deadline = time.monotonic() + 60
    while store.paused() is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.paused() is None
