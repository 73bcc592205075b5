"""The statesweep CLI as a user runs it (the console script, in a subprocess) against a real
``celery -A workers worker``, PostgreSQL and Redis: dispatched runs followed to the end, status,
doctor, and the README's ``celery call`` example."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.conftest import seed_postgres
from tests.processes import CELERY, ROOT, child_env, wait_for_run, workers
from workers import seed
from workers.cli import EXIT_OK
from workers.schema import Tables
from workers.settings import Settings

pytestmark = pytest.mark.acceptance

STATESWEEP = str(Path(sys.executable).with_name("statesweep"))
ROWS = 30_000


@dataclass
class Deployment:
    env: dict[str, str]
    engine: Engine
    tables: Tables
    spec: seed.SeedSpec
    counts: seed.SeedCounts

    def statesweep(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([STATESWEEP, *args], env=child_env(self.env), cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def rows(self) -> int:
        return seed.row_count(self.engine, self.tables)

    def assert_only_expired_rows_deleted(self) -> None:
        assert seed.task_state_rows(self.engine, self.tables) == seed.expected_survivors(
            self.spec)


@pytest.fixture
def deployment(pg_url: str, isolation: dict[str, str], tmp_path: Path) -> Iterator[Deployment]:
    """A seeded database and one running worker consuming this test's queues."""
    db = seed_postgres(pg_url, isolation, ROWS)
    try:
        with workers(db.env, tmp_path, count=1, concurrency=2):
            yield Deployment(db.env, db.engine, db.tables, db.spec, db.counts)
    finally:
        db.engine.dispose()


def test_cleanup_wait_reports_what_it_deleted_and_status_shows_the_run(
        deployment: Deployment) -> None:
    before = deployment.rows()
    done = deployment.statesweep("cleanup", "--wait", "--batch-size", "2000", "--format", "json")
    assert done.returncode == EXIT_OK, done.stderr
    run = json.loads(done.stdout)
    assert run["state"] == "finished" and run["source"] == "cli"
    assert run["rows_deleted"] == before - deployment.rows() == deployment.counts.expired
    assert run["chunks_done"] == run["chunks_planned"] == -(-deployment.counts.expired // 2000)
    deployment.assert_only_expired_rows_deleted()
    assert f"dispatched run {run['run_id']}" in done.stderr
    assert re.search(rf"{run['chunks_planned']}/{run['chunks_planned']} chunks", done.stderr)

    one = deployment.statesweep("status", run["run_id"])
    assert one.returncode == EXIT_OK, one.stderr
    assert f"run {run['run_id']} finished" in one.stdout
    assert f"rows deleted  {deployment.counts.expired:,}" in one.stdout
    overview = deployment.statesweep("status", "--format", "json")
    data = json.loads(overview.stdout)
    assert [r["run_id"] for r in data["runs"]] == [run["run_id"]]
    assert data["backlog"]["expired_rows"] == 0 and data["active_run_id"] == ""

    unknown = deployment.statesweep("status", "20990101T000000Z-nope")
    assert unknown.returncode != EXIT_OK
    assert "unknown run id '20990101T000000Z-nope'" in unknown.stderr


def test_doctor_passes_and_a_no_wait_run_can_be_followed_by_id(deployment: Deployment) -> None:
    doctor = deployment.statesweep("doctor")
    assert doctor.returncode == EXIT_OK, doctor.stdout + doctor.stderr
    control = deployment.env["STATESWEEP_CONTROL_QUEUE"]
    chunks = deployment.env["STATESWEEP_CHUNK_QUEUE"]
    assert re.search(rf"^ok +worker +w1@\S+ consumes {re.escape(chunks)}, {re.escape(control)}$",
                     doctor.stdout, re.MULTILINE), doctor.stdout
    assert doctor.stdout.splitlines()[-1].startswith("healthy")

    sent = deployment.statesweep("cleanup")
    assert sent.returncode == EXIT_OK, sent.stderr
    run_id = sent.stdout.strip()
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", run_id)
    record = wait_for_run(deployment.env, run_id, timeout=60)
    assert record.state == "finished" and record.rows_deleted == deployment.counts.expired
    followed = deployment.statesweep("status", run_id, "--follow", "--format", "json")
    assert json.loads(followed.stdout)["rows_deleted"] == deployment.counts.expired
    deployment.assert_only_expired_rows_deleted()


def test_airflow_command_name_and_the_orphan_sweep(deployment: Deployment) -> None:
    dry = deployment.statesweep("cleanup-task-states", "--dry-run")
    assert dry.returncode == EXIT_OK, dry.stderr
    assert f"expired rows  {deployment.counts.expired:,}" in dry.stdout
    assert deployment.rows() == ROWS

    done = deployment.statesweep("cleanup-task-states", "--verbose")
    assert done.returncode == EXIT_OK, done.stderr
    assert f"rows deleted  {deployment.counts.expired:,}" in done.stdout
    deployment.assert_only_expired_rows_deleted()

    swept = deployment.statesweep("orphans", "--wait", "--format", "json")
    assert swept.returncode == EXIT_OK, swept.stderr
    assert json.loads(swept.stdout)["rows"] == deployment.counts.asset_rows_orphaned
    assert seed.asset_state_rows(deployment.engine, deployment.tables) == (
        seed.expected_live_asset_state(deployment.spec))


def readme_command(prefix: str) -> list[str]:
    """The first command in the docs (README.md, then docs/*.md) that starts with *prefix*,
    as argv: the commands a reader copies must run."""
    pages = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
    for line in "\n".join(p.read_text() for p in pages).splitlines():
        if line.startswith(prefix):
            return shlex.split(line.split("  #")[0])
    raise AssertionError(f"no page of the docs has a line starting with {prefix!r}")


def test_readme_celery_call_example_starts_a_run(deployment: Deployment) -> None:
    from workers.celery_app import COORDINATE, build_app

    argv = readme_command("celery -A workers call statesweep.coordinate")
    control = deployment.env["STATESWEEP_CONTROL_QUEUE"]
    argv = [CELERY if a == "celery" else control if a == "statesweep.control" else a
            for a in argv]
    assert control in argv
    called = subprocess.run(argv, env=child_env(deployment.env), cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert called.returncode == 0, called.stderr
    task_id = called.stdout.strip().splitlines()[-1]

    settings = Settings.from_env(deployment.env)
    with build_app(settings, include_tasks=False) as client:
        summary = client.AsyncResult(task_id).get(timeout=60)
        record = wait_for_run(deployment.env, summary["run_id"], timeout=60)
        assert record.state == "finished" and record.source == "adhoc"
        assert record.rows_deleted == deployment.counts.expired
        deployment.assert_only_expired_rows_deleted()

        # A caller may choose the run id (the CLI does), but only a short, plain one.
        bad = client.send_task(COORDINATE, kwargs={"run_id": "x:*\n../../lock"},
                               queue=control)
        with pytest.raises(Exception, match="run_id must be 1-64 letters"):
            bad.get(timeout=60)


def _registry(deployment: Deployment):  # type: ignore[no-untyped-def]
    from tests.services import REDIS_URL
    from workers.runs import registry_for

    return registry_for(REDIS_URL, deployment.env["STATESWEEP_KEY_PREFIX"])


def test_cleanup_reports_a_resumed_stalled_run_and_follows_it(deployment: Deployment) -> None:
    """Issue: the coordinator's `resumed` reply (a stalled run's chunks sent again) made the
    CLI exit 1 with "… is not in the run store"; it must say so and follow that run."""
    from tests.cleanup_runs import Outbox
    from workers import coordinator
    from workers.window import resend_after

    registry = _registry(deployment)
    settings = Settings.from_env(deployment.env)
    # Planned in this process, its first window "sent" to a worker that died with it: the
    # messages are lost, and were sent longer ago than any redelivery.
    summary = coordinator.coordinate(settings, deployment.engine, deployment.tables, registry,
                                     Outbox(), batch_size=2000, source="beat")
    stalled = summary.run_id
    assert summary.status == "started"
    inflight = f"{registry.prefix}:run:{stalled}:inflight"
    long_ago = time.time() - 2 * resend_after(settings)
    for number, value in registry.client.hgetall(inflight).items():
        rng, _sent, st = value.split("|")
        registry.client.hset(inflight, number, f"{rng}|{long_ago}|{st}")

    done = deployment.statesweep("cleanup", "--wait", "--format", "json")
    assert done.returncode == EXIT_OK, done.stderr
    assert f"run {stalled} had stalled; this trigger resumed it" in done.stderr
    run = json.loads(done.stdout)
    assert (run["run_id"], run["state"]) == (stalled, "finished")
    assert run["rows_deleted"] == deployment.counts.expired
    deployment.assert_only_expired_rows_deleted()


def test_a_skipped_cleanup_says_skipped_and_exits_refused(deployment: Deployment) -> None:
    """Issue: a trigger skipped behind an active run printed the active run's id on stdout
    with exit 0, so `run=$(statesweep cleanup)` silently got another run."""
    from workers.cli import EXIT_REFUSED

    registry = _registry(deployment)
    assert registry.acquire("someone-else", 120) is None
    try:
        for args in (("cleanup",), ("cleanup", "--wait")):
            done = deployment.statesweep(*args)
            assert done.returncode == EXIT_REFUSED, done.stderr
            assert done.stdout == ""
            assert "skipped: run someone-else is active" in done.stderr
        as_json = deployment.statesweep("cleanup", "--format", "json")
        assert as_json.returncode == EXIT_REFUSED
        assert json.loads(as_json.stdout)["status"] == "skipped"
    finally:
        registry.release("someone-else")
    assert deployment.rows() == ROWS


def test_a_worker_skips_both_tasks_for_a_custom_airflow_backend(
        pg_url: str, isolation: dict[str, str], tmp_path: Path) -> None:
    """The coordinator and the orphan sweep, sent to a real worker whose Airflow configuration
    (airflow.cfg) names a custom state backend: both skip, nothing is deleted."""
    from workers.celery_app import COORDINATE, SWEEP_ORPHANS, build_app

    db = seed_postgres(pg_url, isolation, 2000)
    (tmp_path / "airflow.cfg").write_text("[state_store]\nbackend = company.state.Backend\n")
    env = {**db.env, "AIRFLOW_HOME": str(tmp_path)}
    before = (seed.row_count(db.engine, db.tables), seed.asset_state_rows(db.engine, db.tables))
    try:
        with workers(env, tmp_path, count=1, concurrency=1) as started:
            settings = Settings.from_env(env)
            with build_app(settings, include_tasks=False) as client:
                run = client.send_task(COORDINATE, queue=settings.control_queue,
                                       kwargs={"source": "adhoc"}).get(timeout=60)
                swept = client.send_task(SWEEP_ORPHANS, queue=settings.control_queue).get(
                    timeout=60)
            log = started[0].log()
        assert run["status"] == swept["status"] == "custom_backend"
        assert log.count("custom backend configured; skipping") == 2, log
        assert (seed.row_count(db.engine, db.tables),
                seed.asset_state_rows(db.engine, db.tables)) == before
    finally:
        db.engine.dispose()
