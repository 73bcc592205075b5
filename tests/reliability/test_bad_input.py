"""Bad input reaching a real worker: ad-hoc task calls with wrong arguments, and databases
without the tables or the expires_at column statesweep needs. Each fails with a message naming
the argument, table or column, is not retried, and deletes nothing."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult
from sqlalchemy import Engine, inspect, text

from tests.processes import CELERY, ROOT, child_env, start_worker
from tests.reliability.conftest import Scenario, Seeder
from tests.reliability.faults import RedisServer
from tests.reliability.pipeline import Pipeline, pipeline_env
from workers.celery_app import SWEEP_ORPHANS
from workers.db import db_now, make_engine
from workers.planners import Plan
from workers.runs import Gate
from workers.seed import SeedSpec
from workers.settings import Settings

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(90)]

STATESWEEP = str(Path(CELERY).with_name("statesweep"))
EXIT_SCHEMA = 4


def test_bad_task_arguments_fail_clearly_and_delete_nothing(
        pg_url: str, seeded: Seeder, isolation: dict[str, str], redis_server: RedisServer,
        tmp_path: Path, scenario: Scenario) -> None:
    spec = SeedSpec(rows=5000)
    engine, tables = seeded(spec)
    env = pipeline_env(pg_url, redis_server.url, isolation)
    p = Pipeline(env, engine, tables, spec, tmp_path)
    with engine.connect() as conn:
        now = db_now(conn)
    # Every chunk below spans the whole table with a cutoff that makes its rows deletable:
    # only argument checking stands between it and a DELETE.
    past, future = now.isoformat(), (now + dt.timedelta(days=2)).isoformat()
    # Each planned run holds the lock while its messages arrive (a chunk of a run that does not
    # hold it is refused anyway): future-run first, then known-run, planned once future-run's
    # message has been answered.
    _planned_whole_table(p, "future-run", future, spec.rows)
    whole = {"run_id": "known-run", "chunk": 1, "kind": "ids", "lo": 1, "hi": spec.rows + 1,
             "cutoff": past}
    chunk_cases: list[tuple[dict[str, Any], str]] = [
        ({**whole, "chunk": "1"}, "chunk must be a whole number, got '1'"),
        ({**whole, "lo": "1"}, "lo must be a whole number, got '1'"),
        ({**whole, "hi": 5000.0}, "hi must be a whole number, got 5000.0"),
        ({**whole, "lo": spec.rows, "hi": 1}, "hi must be above lo"),
        ({**whole, "kind": "rows"},
         "kind must be one of blocks, ids, walk, expiry, dags, got 'rows'"),
        ({**whole, "hi": None}, "only a blocks or expiry range may be open-ended"),
        ({**whole, "run_id": ""}, "run_id must be 1-64 letters"),
        # A run id with ':' would address another run's keys in the run store.
        ({**whole, "run_id": "known-run:inflight"}, "run_id must be 1-64 letters"),
        ({**whole, "cutoff": "yesterday"}, "cutoff is not an ISO-8601 timestamp: 'yesterday'"),
        ({**whole, "cutoff": now.replace(tzinfo=None).isoformat()}, "must carry a UTC offset"),
        ({**whole, "run_id": "no-such-run"}, "unknown run id 'no-such-run'"),
        # Chunks the plan never had, or bounds it never cut, are refused before any DELETE.
        ({**whole, "chunk": 2}, "chunk 2 (ids 1:5001) is not in run known-run's plan"),
        ({**whole, "lo": 0, "hi": 10**12}, "is not in run known-run's plan (planned: ids 1:5001)"),
        ({**whole, "cutoff": future}, "is not run known-run's cutoff"),
        ({"run_id": "known-run", "chunk": 1}, "missing"),
    ]
    control_cases: list[tuple[str, dict[str, Any], str]] = [
        ("coordinate", {"batch_size": -5}, "batch_size must be 0 (one chunk) or a number of "
         "rows up to 10,000,000, got -5"),
        ("coordinate", {"batch_size": 10 ** 20}, "up to 10,000,000, got 1000000000000000000"),
        ("coordinate", {"batch_size": "100"}, "batch_size must be a whole number, got '100'"),
        ("coordinate", {"source": 5}, "source must be a string"),
        ("orphans", {"batch_size": -1}, "batch_size must be 0 (one chunk) or a number of rows "
         "up to 10,000,000, got -1"),
    ]
    before = p.counts()
    assets_before = _asset_rows(p)
    scenario.before(before)
    worker = start_worker(env, tmp_path, "a")
    try:
        with p.client() as app:
            ahead = {**whole, "run_id": "future-run", "cutoff": future}
            outcomes = [(_failure(p.send_chunk(app, **ahead), "future-run"), "is in the future",
                         f"delete_chunk {ahead}")]
            p.registry.release("future-run")
            _planned_whole_table(p, "known-run", past, spec.rows)
            sent: list[tuple[AsyncResult[Any], str, str]] = []
            for kwargs, says in chunk_cases:
                sent.append((p.send_chunk(app, **kwargs), says, f"delete_chunk {kwargs}"))
            for task, kwargs, says in control_cases:
                result = (p.trigger(app, **kwargs) if task == "coordinate" else app.send_task(
                    SWEEP_ORPHANS, kwargs=kwargs, queue=p.settings.control_queue))
                sent.append((result, says, f"{task} {kwargs}"))
            outcomes += [(_failure(r, what), says, what) for r, says, what in sent]
    finally:
        worker.stop()
    after = p.counts()
    scenario.after(after)
    scenario.note(bad_calls=len(outcomes))
    for message, says, what in outcomes:
        assert says in message, f"{what}: {message!r}"
    assert after == before
    assert _asset_rows(p) == assets_before
    assert p.registry.get("no-such-run") is None
    # No malformed message, not even one Python refused to call (arguments missing), counts as
    # a failed chunk of the run it names.
    known = p.registry.get("known-run")
    assert known is not None and (known.state, known.chunks_failed) == ("running", 0), known
    assert p.rows() == {(i + 1, f"value_{i}") for i in range(spec.rows)}
    assert "Retry in" not in worker.log(), "bad arguments must fail at once, not retry"


def _planned_whole_table(p: Pipeline, run_id: str, cutoff: str, rows: int) -> None:
    """Record *run_id* as a running run, holding the lock, whose one chunk is ids 1..rows: a
    message that matches it exactly would delete every row expired at *cutoff*."""
    assert p.registry.acquire(run_id, 600) is None
    plan = Plan("ids", "ids", 1, rows + 1, rows, 0, "test: the whole table in one chunk")
    window = p.registry.start(run_id, plan, cutoff=cutoff, batch_size=rows, source="test",
                              window=1, lock_ttl=60, resend_after=3600, gate=Gate())
    assert not isinstance(window, str) and [n for n, _ in window.chunks] == [1]


def _failure(result: AsyncResult[Any], what: str) -> str:
    with pytest.raises(Exception) as info:
        result.get(timeout=30)
    assert result.state == "FAILURE", (what, result.id, result.state, info.value)
    return f"{type(info.value).__name__}: {info.value}"


def _asset_rows(p: Pipeline) -> int:
    with p.engine.connect() as conn:
        return int(conn.execute(
            text(f"SELECT count(*) FROM {p.tables.asset_state.name}")).scalar_one())  # noqa: S608


@pytest.mark.parametrize("problem", ["no_tables", "no_expires_at"])
def test_database_without_the_schema_fails_clearly(
        problem: str, pg_url: str, seeded: Seeder, isolation: dict[str, str],
        redis_server: RedisServer, tmp_path: Path, scenario: Scenario) -> None:
    if problem == "no_expires_at":
        engine, _ = seeded(SeedSpec(rows=2000))
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE task_state DROP COLUMN expires_at"))
        says = "column task_state.expires_at is missing"
    else:
        engine = make_engine(pg_url)
        says = "holds neither task_state nor task_state_store"
    env = pipeline_env(pg_url, redis_server.url, isolation)
    Settings.from_env(env)  # the settings are valid: only the schema is missing
    try:
        rows_before = _task_state_rows(engine)
        scenario.note(rows_before=rows_before)
        cli = subprocess.run([STATESWEEP, "cleanup", "--local"], cwd=ROOT, env=child_env(env),
                             capture_output=True, text=True, timeout=60)
        # A worker refuses to start on such a database, rather than report ready and fail
        # every task it takes: one line, the schema exit code.
        with pytest.raises(RuntimeError) as refused:
            start_worker(env, tmp_path, "a")
        rows_after = _task_state_rows(engine)
        scenario.note(rows_after=rows_after)
    finally:
        engine.dispose()
    output = cli.stdout + cli.stderr
    assert cli.returncode == EXIT_SCHEMA, output
    assert says in output and "Traceback" not in output, output
    assert f"exited with {EXIT_SCHEMA}" in str(refused.value), str(refused.value)
    assert says in str(refused.value) and "Traceback" not in str(refused.value)
    assert rows_after == rows_before


def _task_state_rows(engine: Engine) -> int | None:
    """Rows in task_state, or None when there is no such table."""
    if "task_state" not in inspect(engine).get_table_names():
        return None
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM task_state")).scalar_one())
