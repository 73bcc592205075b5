"""A worker and beat refuse to start without a run store they can share (issue 21, repro 3):
real `celery worker` and `celery beat` processes on RabbitMQ with a result backend that is not
Redis and no STATESWEEP_RUN_STORE_URL. Before, each process silently got its own memory://
store, so triggers started several runs and chunks hit NotFound. The CLI's embedded mode
(`cleanup --local`, one process) keeps working on the same settings."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import Broker
from tests.conftest import seed_postgres
from tests.processes import CELERY, ROOT, child_env, start_worker
from workers.exit_codes import EXIT_OK, EXIT_SETTINGS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

STATESWEEP = str(Path(CELERY).with_name("statesweep"))
START_TIMEOUT = 30  # a refusing process exits in a few seconds; a started one runs on


@pytest.fixture
def rabbit_env(pg_url: str, isolation: dict[str, str], broker: Broker) -> Iterator[dict[str, str]]:
    """RabbitMQ as broker, rpc:// results (not Redis), no run store: a seeded database, so
    nothing but the run store stands between these settings and a running worker."""
    db = seed_postgres(pg_url, isolation, 2000)
    try:
        yield {"STATESWEEP_DATABASE_URL": pg_url, "STATESWEEP_BROKER_URL": broker.url,
               "STATESWEEP_RESULT_BACKEND": "rpc://", **isolation}
    finally:
        db.engine.dispose()


def _one_line_refusal(output: str, role: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    refusal = [line for line in lines if f"statesweep: {role} not started" in line]
    assert len(refusal) == 1, output
    line = refusal[0]
    assert "STATESWEEP_RUN_STORE_URL is unset" in line and "set STATESWEEP_RUN_STORE_URL" in line
    assert "STATESWEEP_RESULT_BACKEND='rpc://'" in line, line
    assert "amqp://guest:***@" in line and "guest:guest" not in output, line
    assert "Traceback" not in output, output


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_worker_refuses_an_implicit_per_process_run_store(
        rabbit_env: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as refused:
        worker = start_worker(rabbit_env, tmp_path, "implicit", ready_timeout=START_TIMEOUT)
        worker.stop()  # it started: the test fails below, without leaving a worker behind
    assert f"exited with {EXIT_SETTINGS}" in str(refused.value), str(refused.value)
    _one_line_refusal(str(refused.value), "worker")


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_beat_refuses_an_implicit_per_process_run_store(
        rabbit_env: dict[str, str], tmp_path: Path) -> None:
    cmd = [CELERY, "-A", "workers", "beat", "-l", "INFO",
           "-s", str(tmp_path / "beat-schedule")]
    try:
        beat = subprocess.run(cmd, cwd=ROOT, env=child_env(rabbit_env), capture_output=True,
                              text=True, timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"beat started on a per-process run store (still running after "
                    f"{START_TIMEOUT}s): {exc.stderr!r}")
    output = beat.stdout + beat.stderr
    assert beat.returncode == EXIT_SETTINGS, output
    _one_line_refusal(output, "beat")


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_cli_local_run_keeps_its_embedded_run_store(rabbit_env: dict[str, str]) -> None:
    """One process plans and deletes: its memory:// store is shared by all it runs."""
    cli = subprocess.run([STATESWEEP, "cleanup", "--local"], cwd=ROOT,
                         env=child_env(rabbit_env), capture_output=True, text=True, timeout=60)
    assert cli.returncode == EXIT_OK, cli.stdout + cli.stderr
