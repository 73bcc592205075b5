"""`statesweep demo` (what `make demo` runs) needs no service at all: with the database, broker
and result backend pointed at closed ports it still seeds SQLite, runs an in-process worker,
and proves the run deleted every expired row and nothing live."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import child_env
from workers.cli import EXIT_OK

pytestmark = pytest.mark.acceptance

STATESWEEP = str(Path(sys.executable).with_name("statesweep"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_runs_with_every_service_unreachable(tmp_path: Path) -> None:
    port = closed_port()
    nowhere = {
        "STATESWEEP_DATABASE_URL": f"postgresql://nobody:secret@127.0.0.1:{port}/airflow",
        "STATESWEEP_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        "STATESWEEP_RESULT_BACKEND": f"redis://127.0.0.1:{port}/0",
        "STATESWEEP_CLEANUP_BATCH_SIZE": "3000",  # settings it does not replace still apply
    }
    done = subprocess.run([STATESWEEP, "demo", "--rows", "20000"], cwd=tmp_path,
                          env=child_env(nowhere), capture_output=True, text=True, timeout=180,
                          check=False)
    assert done.returncode == EXIT_OK, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "expired left: 0, live rows lost: 0" in lines
    assert "orphaned asset state left: 0, live asset state lost: 0" in lines
    # 20 000 rows, 11 of every 20 expired: 11 000 deleted in chunks of 3 000.
    assert lines[0].startswith("run ") and " finished: 11,000 expired rows deleted in 4 chunks" in (
        lines[0])
    assert "orphaned asset state: 170 rows deleted" in lines[1]
    assert (tmp_path / "statesweep-demo.db").exists()
    # Progress on stderr, data on stdout; the bar from the moment the coordinator is sent
    # (before the run's first log line), not only once the run is done (issue 22 item 12).
    progress = [line for line in done.stderr.splitlines() if line.startswith("demo run ")]
    assert progress and "demo run " not in done.stdout
    first_log = next(i for i, line in enumerate(done.stderr.splitlines())
                     if "cleanup_run_started" in line)
    assert done.stderr.splitlines().index(progress[0]) < first_log, done.stderr
    assert "100%|" in progress[-1] and "| 4/4 chunks  11,000 rows" in progress[-1]


def test_demo_recreates_its_database_each_time(tmp_path: Path) -> None:
    db = tmp_path / "again.db"
    for _ in range(2):
        done = subprocess.run([STATESWEEP, "demo", "--rows", "2000", "--db", str(db)],
                              cwd=tmp_path, env=child_env({}), capture_output=True, text=True,
                              timeout=180, check=False)
        assert done.returncode == EXIT_OK, done.stdout + done.stderr
        assert "expired left: 0, live rows lost: 0" in done.stdout.splitlines()
        assert "2,000 task state rows" in done.stderr
