"""The statesweep CLI against real PostgreSQL and Redis, driven in-process with click's
CliRunner (the top-level handler and exit codes included). No worker here: dry runs, --local
runs, status, doctor and every bad argument; tests/acceptance/test_cli_worker.py has the rest."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import Result
from sqlalchemy import Engine, func, select, text

from tests.cli_runner import (  # noqa: F401 - restore_logging: autouse fixture
    closed_port,
    invoke,
    restore_logging,
)
from tests.conftest import seed_postgres
from tests.processes import child_env
from tests.services import REDIS_URL
from workers import seed
from workers.cli import (
    EXIT_BAD_ARGUMENT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SETTINGS,
    EXIT_UNAVAILABLE,
    EXIT_UNHEALTHY,
)
from workers.runs import registry_for
from workers.schema import Tables

pytestmark = pytest.mark.integration

ROWS = 20_000
STATESWEEP = str(Path(sys.executable).with_name("statesweep"))


@dataclass
class Seeded:
    env: dict[str, str]
    engine: Engine
    tables: Tables
    spec: seed.SeedSpec
    counts: seed.SeedCounts

    def task_rows(self) -> int:
        return seed.row_count(self.engine, self.tables)

    def asset_rows(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(
                select(func.count()).select_from(self.tables.asset_state)).scalar_one())

    def expired_now(self) -> int:
        t = self.tables.task_state
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(t)
                                    .where(t.c.expires_at < func.now())).scalar_one())

    def invoke(self, *args: str, **env: str) -> Result:
        return invoke(*args, env={**self.env, **env})


@pytest.fixture
def seeded(pg_url: str, isolation: dict[str, str]) -> Iterator[Seeded]:
    db = seed_postgres(pg_url, isolation, ROWS)
    try:
        yield Seeded(db.env, db.engine, db.tables, db.spec, db.counts)
    finally:
        db.engine.dispose()


def test_dry_run_counts_the_expired_rows_and_deletes_nothing(seeded: Seeded) -> None:
    before = seeded.task_rows()
    result = seeded.invoke("cleanup", "--dry-run", "--batch-size", "3000", "--format", "json")
    assert result.exit_code == EXIT_OK, result.stderr
    data = json.loads(result.stdout)
    assert data["expired_rows"] == seeded.counts.expired == seeded.expired_now()
    assert data["chunks"] == -(-seeded.counts.expired // 3000)
    assert data["table"] == "task_state" and data["dry_run"] is True
    assert sum(d["rows"] for d in data["top_dag_ids"]) <= data["expired_rows"]
    assert len(data["top_dag_ids"]) == 10 and len(data["sample"]) == 10
    assert seeded.task_rows() == before


def test_dry_run_text_is_bounded_however_many_chunks(seeded: Seeded) -> None:
    result = seeded.invoke("cleanup", "--dry-run", "--batch-size", "10")
    assert result.exit_code == EXIT_OK, result.stderr
    assert f"expired rows  {seeded.counts.expired:,}" in result.stdout
    assert f"chunks        {-(-seeded.counts.expired // 10):,}" in result.stdout
    # 1 100 chunks, yet the output is a fixed handful of lines: counts, top 10, sample of 10.
    assert len(result.stdout.splitlines()) <= 30


def test_local_run_deletes_what_it_reports_and_status_shows_it(seeded: Seeded) -> None:
    before = seeded.task_rows()
    result = seeded.invoke("cleanup", "--local", "--batch-size", "3000", "--format", "json")
    assert result.exit_code == EXIT_OK, result.stderr
    run = json.loads(result.stdout)
    assert run["state"] == "finished" and run["source"] == "cli-local"
    assert run["rows_deleted"] == before - seeded.task_rows() == seeded.counts.expired
    assert run["chunks_done"] == run["chunks_planned"] == -(-seeded.counts.expired // 3000)
    assert seed.task_state_rows(seeded.engine, seeded.tables) == seed.expected_survivors(
        seeded.spec)
    assert "chunks" in result.stderr  # the progress line went to stderr, not stdout

    one = seeded.invoke("status", run["run_id"], "--format", "json")
    assert one.exit_code == EXIT_OK, one.stderr
    assert json.loads(one.stdout)["rows_deleted"] == run["rows_deleted"]
    overview = seeded.invoke("status")
    assert overview.exit_code == EXIT_OK, overview.stderr
    assert run["run_id"] in overview.stdout and "finished" in overview.stdout
    assert "backlog: 0 expired rows" in overview.stdout
    assert "active run: none" in overview.stdout


def test_status_of_an_unknown_run_fails(seeded: Seeded) -> None:
    result = seeded.invoke("status", "no-such-run")
    assert result.exit_code == EXIT_BAD_ARGUMENT
    assert "unknown run id 'no-such-run'" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("args", [
    ("cleanup", "--batch-size", "-5"),
    ("cleanup", "--local", "--batch-size", "-5"),
    ("cleanup", "--wait", "--batch-size", "-5"),
    ("orphans", "--local", "--batch-size", "-5"),
    ("cleanup", "--local", "--batch-size", str(10 ** 20)),
    ("cleanup", "--batch-size", "10000001"),
])
def test_negative_batch_size_is_refused_and_nothing_is_deleted(seeded: Seeded,
                                                               args: tuple[str, ...]) -> None:
    tasks, assets = seeded.task_rows(), seeded.asset_rows()
    result = seeded.invoke(*args)
    assert result.exit_code == EXIT_BAD_ARGUMENT
    assert "--batch-size" in result.stderr and args[-1] in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (seeded.task_rows(), seeded.asset_rows()) == (tasks, assets)


@pytest.mark.parametrize(("command", "var", "value"), [
    ("cleanup", "STATESWEEP_DATABASE_URL", "not a url"),
    ("cleanup --local", "STATESWEEP_DATABASE_URL", "oracle://scott:tiger@db/orcl"),
    ("cleanup --wait", "STATESWEEP_BROKER_URL", "localhost"),
    ("cleanup", "STATESWEEP_RESULT_BACKEND", "redis://127.0.0.1:notaport/0"),
    ("cleanup --local", "STATESWEEP_CLEANUP_BATCH_SIZE", "-1"),
    ("orphans --local", "STATESWEEP_CLEANUP_BATCH_SIZE", "ten"),
    ("doctor", "STATESWEEP_BROKER_URL", "localhost"),
    ("status", "STATESWEEP_RUN_STORE_URL", "http://127.0.0.1/"),
])
def test_malformed_settings_are_named_and_nothing_is_deleted(
        seeded: Seeded, command: str, var: str, value: str) -> None:
    tasks, assets = seeded.task_rows(), seeded.asset_rows()
    result = seeded.invoke(*command.split(), **{var: value})
    assert result.exit_code == EXIT_SETTINGS
    assert var in result.stderr
    shown = value.replace(":tiger@", ":***@")
    assert repr(shown) in result.stderr and "tiger" not in result.stderr
    assert (seeded.task_rows(), seeded.asset_rows()) == (tasks, assets)


def test_unreachable_broker_is_named_and_nothing_is_sent(seeded: Seeded) -> None:
    dead = f"redis://:s3cret@127.0.0.1:{closed_port()}/0"
    tasks = seeded.task_rows()
    result = seeded.invoke("cleanup", "--wait", STATESWEEP_BROKER_URL=dead)
    assert result.exit_code == EXIT_UNAVAILABLE
    assert "STATESWEEP_BROKER_URL=redis://:***@127.0.0.1" in result.stderr
    assert "s3cret" not in result.stderr and "Connection refused" in result.stderr
    assert seeded.task_rows() == tasks


def test_unreachable_database_is_named(seeded: Seeded) -> None:
    dead = f"postgresql://postgres:hunter2@127.0.0.1:{closed_port()}/nowhere"
    result = seeded.invoke("cleanup", "--dry-run", STATESWEEP_DATABASE_URL=dead)
    assert result.exit_code == EXIT_UNAVAILABLE
    assert "STATESWEEP_DATABASE_URL=postgresql://postgres:***@127.0.0.1" in result.stderr
    assert "hunter2" not in result.stderr


def test_doctor_fails_clearly_when_redis_is_unreachable(seeded: Seeded) -> None:
    dead = f"redis://:s3cret@127.0.0.1:{closed_port()}/0"
    result = seeded.invoke("doctor", STATESWEEP_BROKER_URL=dead, STATESWEEP_RESULT_BACKEND=dead)
    assert result.exit_code == EXIT_UNHEALTHY
    assert "s3cret" not in result.output
    lines = result.stdout.splitlines()
    masked = dead.replace("s3cret", "***")
    assert any(line.startswith("FAIL  broker") and masked in line and "refused" in line
               for line in lines)
    assert any(line.startswith("FAIL  run store") for line in lines)
    assert any(line.startswith("ok    database") for line in lines)
    assert lines[-1].startswith("UNHEALTHY")


def test_doctor_fails_with_the_create_index_statement(seeded: Seeded) -> None:
    with seeded.engine.begin() as conn:
        conn.execute(text("DROP INDEX idx_task_state_expires_at"))
    result = seeded.invoke("doctor", "--format", "json")
    data = json.loads(result.stdout)
    index = next(c for c in data["checks"] if c["name"] == "expires_at index")
    assert index["status"] == "fail"  # the auto planner reads it (test_doctor_checks.py)
    assert ("CREATE INDEX CONCURRENTLY idx_task_state_expires_at ON task_state (expires_at);"
            in index["detail"])
    # No worker consumes this test's queues, so doctor is unhealthy, and says why.
    assert result.exit_code == EXIT_UNHEALTHY
    assert [c["status"] for c in data["checks"] if c["name"] == "queue"] == ["fail", "fail"]
    assert data["settings"]["key_prefix"] == seeded.env["STATESWEEP_KEY_PREFIX"]


def test_orphans_dry_run_counts_and_local_sweep_deletes_them(seeded: Seeded) -> None:
    dry = seeded.invoke("orphans", "--dry-run", "--format", "json")
    assert dry.exit_code == EXIT_OK, dry.stderr
    assert json.loads(dry.stdout)["orphaned_rows"] == seeded.counts.asset_rows_orphaned
    assert seeded.asset_rows() == seeded.counts.asset_rows_live + seeded.counts.asset_rows_orphaned
    swept = seeded.invoke("orphans", "--local", "--batch-size", "50", "--format", "json")
    assert swept.exit_code == EXIT_OK, swept.stderr
    assert json.loads(swept.stdout)["rows"] == seeded.counts.asset_rows_orphaned
    assert seed.asset_state_rows(seeded.engine, seeded.tables) == seed.expected_live_asset_state(
        seeded.spec)
    assert seeded.task_rows() == ROWS  # task state is never touched by the orphan sweep


def test_local_run_waits_its_turn_behind_an_active_run(seeded: Seeded) -> None:
    registry = registry_for(REDIS_URL, seeded.env["STATESWEEP_KEY_PREFIX"])
    assert registry.acquire("someone-else", 60) is None
    try:
        result = seeded.invoke("cleanup", "--local")
    finally:
        registry.release("someone-else")
    assert result.exit_code == EXIT_REFUSED
    assert "run someone-else is active" in result.stderr
    assert seeded.task_rows() == ROWS



def _followable_run(seeded: Seeded, queue: str, stderr: str) -> str:
    """The run id a Ctrl-C once the coordinator is out names, having checked that it says how
    to follow the run and that the run is still queued."""
    assert f"stopped waiting; the coordinator stays queued on {queue} and runs as " in stderr, \
        stderr
    run_id = stderr.split(" and runs as ")[1].split()[0]
    assert f"statesweep status {run_id} --follow" in stderr
    record = registry_for(REDIS_URL, seeded.env["STATESWEEP_KEY_PREFIX"]).get(run_id)
    assert record is not None and record.state == "queued"
    return run_id


def _interrupted_cleanup(seeded: Seeded) -> tuple[Result, int]:
    """`cleanup --wait` in this process (a test has patched where the Ctrl-C lands), and the
    coordinator messages left on the queue, which is then emptied."""
    queue = seeded.env["STATESWEEP_CONTROL_QUEUE"]
    client = redis.Redis.from_url(REDIS_URL)
    try:
        result = seeded.invoke("cleanup", "--wait")
        return result, int(client.llen(queue))
    finally:
        client.delete(queue)
        client.close()


def test_ctrl_c_stops_following_and_says_how_to_resume(seeded: Seeded) -> None:
    """No worker consumes this test's queues, so --wait waits for one until Ctrl-C."""
    broker = redis.Redis.from_url(REDIS_URL)
    queue = seeded.env["STATESWEEP_CONTROL_QUEUE"]
    # A child whose parent ignores SIGINT inherits that; give the CLI the default handler.
    proc = subprocess.Popen([STATESWEEP, "cleanup", "--wait"], env=child_env(seeded.env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not broker.llen(queue) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert broker.llen(queue) == 1, "the coordinator was never sent"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        broker.delete(queue)  # the coordinator would wait forever for a worker; drop it
        broker.close()
    assert proc.returncode == EXIT_INTERRUPTED, err
    # Whenever the Ctrl-C lands once the message is out (in the send itself, held until it
    # is out; before or after the "dispatched run" line), it says how to follow the run.
    _followable_run(seeded, queue, err)
    assert "Traceback" not in err and out == ""
    assert seeded.task_rows() == ROWS


def test_ctrl_c_right_after_the_send_says_how_to_follow_too(
        seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between the send and the wait for a pickup (here: while the CLI subscribes to the
    run's changes) says what a later one says, not a bare "aborted" (a clean-clone run caught
    the subprocess test above there)."""
    import workers.cli.watch

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(workers.cli.watch, "watch_run", interrupted)
    result, pending = _interrupted_cleanup(seeded)
    assert result.exit_code == EXIT_INTERRUPTED, result.output
    assert pending == 1
    run_id = _followable_run(seeded, seeded.env["STATESWEEP_CONTROL_QUEUE"], result.stderr)
    assert f"dispatched run {run_id} " in result.stderr
    assert seeded.task_rows() == ROWS


def test_ctrl_c_during_the_send_is_held_until_the_message_is_out(
        seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGINT that arrives while the coordinator is being sent (here: just after the broker
    took it, before send_task returns) is held until the send is whole: the run stays queued
    (not closed as never sent, with its message on the queue) and the CLI says how to follow
    it (clean-clone run 7 caught the subprocess test above there)."""
    import os

    from celery import Celery

    send = Celery.send_task

    def interrupted_send(self: Celery, *args: Any, **kwargs: Any) -> Any:
        result = send(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Celery, "send_task", interrupted_send)
    result, pending = _interrupted_cleanup(seeded)
    assert result.exit_code == EXIT_INTERRUPTED, result.output
    assert pending == 1
    _followable_run(seeded, seeded.env["STATESWEEP_CONTROL_QUEUE"], result.stderr)
    assert seeded.task_rows() == ROWS


def _expired_by_dag(seeded: Seeded) -> dict[str, int]:
    t = seeded.tables.task_state
    with seeded.engine.connect() as conn:
        return {str(d): int(n) for d, n in conn.execute(
            select(t.c.dag_id, func.count()).where(t.c.expires_at < func.now())
            .group_by(t.c.dag_id))}


def test_cleanup_takes_airflow_db_cleans_selection(seeded: Seeded) -> None:
    """--dag-ids, --exclude-dag-ids and --clean-before-timestamp, as `airflow db clean` spells
    them: the dry run counts what the run then deletes, per dag id, and nothing else goes."""
    before = _expired_by_dag(seeded)
    dry = seeded.invoke("cleanup", "--dry-run", "--dag-ids", "dag_1,dag_2", "--top", "5",
                        "--format", "json")
    assert dry.exit_code == EXIT_OK, dry.stderr
    data = json.loads(dry.stdout)
    assert data["expired_rows"] == before["dag_1"] + before["dag_2"]
    assert {d["dag_id"] for d in data["top_dag_ids"]} == {"dag_1", "dag_2"}
    assert data["selection"] == "dag ids dag_1, dag_2"
    assert _expired_by_dag(seeded) == before  # a dry run deletes nothing
    run = seeded.invoke("cleanup", "--local", "--dag-ids", "dag_1,dag_2", "--format", "json")
    assert run.exit_code == EXIT_OK, run.stderr
    assert json.loads(run.stdout)["rows_deleted"] == data["expired_rows"]
    assert _expired_by_dag(seeded) == {d: n for d, n in before.items()
                                       if d not in ("dag_1", "dag_2")}
    keep = [d for d in before if d not in ("dag_1", "dag_2")][:3]
    rest = seeded.invoke("cleanup", "--local", "--exclude-dag-ids", ",".join(keep))
    assert rest.exit_code == EXIT_OK, rest.stderr
    assert _expired_by_dag(seeded) == {d: before[d] for d in keep}


@pytest.mark.parametrize(("args", "needle"), [
    (("--clean-before-timestamp", "yesterday"), "--clean-before-timestamp is not an ISO-8601"),
    (("--dag-ids", "a,,b"), "--dag-ids must name dag ids"),
])
def test_a_bad_selection_is_one_line_and_deletes_nothing(seeded: Seeded, args: tuple[str, ...],
                                                        needle: str) -> None:
    rows = seeded.task_rows()
    for mode in ("--local", "--dry-run", "--wait"):
        result = seeded.invoke("cleanup", mode, *args)
        assert result.exit_code == EXIT_BAD_ARGUMENT, (mode, result.stderr)
        assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert seeded.task_rows() == rows
