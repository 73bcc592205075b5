"""`statesweep cleanup --wait` on a run the walk planner cuts as it goes, against real workers:
the progress lines say how far planning has got, never a total or an ETA it does not have
(issue 22 item 7: `0/1901+ chunks, planned 0, ETA 0.0s` until STALLED)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.acceptance.test_cli_worker import STATESWEEP
from tests.conftest import seed_postgres
from tests.processes import ROOT, child_env, workers
from workers.cli import EXIT_OK

pytestmark = pytest.mark.acceptance

ROWS = 30_000
BATCH = 250
# 66 chunks at 4 a second take at least 16 s, so the follower writes its line (every 5 s into
# a pipe) while chunks are still being cut: a lower bound on the run's length, not a timing.
RATE = "4/s"


def test_wait_on_a_walk_run_shows_planning_progress_not_a_zero_eta(
        pg_url: str, isolation: dict[str, str], tmp_path: Path) -> None:
    db = seed_postgres(pg_url, isolation, ROWS)
    env = {**db.env, "STATESWEEP_PLANNER": "walk", "STATESWEEP_CHUNK_RATE_LIMIT": RATE,
           "STATESWEEP_MAX_CHUNKS_IN_FLIGHT": "2"}
    try:
        with workers(env, tmp_path, count=2, concurrency=1):
            done = subprocess.run(
                [STATESWEEP, "cleanup", "--wait", "--batch-size", str(BATCH), "--format",
                 "json"], env=child_env(env), cwd=ROOT, capture_output=True, text=True,
                timeout=240, check=False)
        assert done.returncode == EXIT_OK, done.stderr
        run = json.loads(done.stdout)
        assert run["planner"] == "walk" and run["state"] == "finished"
        assert run["rows_deleted"] == db.counts.expired
        chunks = -(-db.counts.expired // BATCH)
        assert run["chunks_done"] == chunks
        print(done.stderr)  # shown when the test fails
        lines = [line for line in done.stderr.splitlines()
                 if line.startswith(f"run {run['run_id']} ")]
        planning = [line for line in lines if "planning: " in line]
        assert any("chunks cut so far" in line for line in planning), done.stderr
        assert all("ETA" not in line and "%|" not in line for line in planning), planning
        assert "ETA 0.0s" not in done.stderr
        assert "100%|" in lines[-1] and f"| {chunks}/{chunks} chunks" in lines[-1], lines
    finally:
        db.engine.dispose()
