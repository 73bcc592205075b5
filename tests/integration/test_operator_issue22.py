"""Issue 22, item 3: `statesweep status` with the database down still shows the runs (they live
in the run store, on real Redis) and says in one line that the backlog is unknown, exiting 0;
only a run store that is down is an error."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from click.testing import Result

from tests import cli_runner
from tests.cleanup_runs import id_plan, start_plan
from tests.cli_runner import (  # noqa: F401 - restore_logging: autouse fixture
    closed_port,
    restore_logging,
)
from tests.services import REDIS_URL, require
from workers.exit_codes import EXIT_OK, EXIT_UNAVAILABLE
from workers.runs import RunStore

SECRET = "hunter2-issue22"


@pytest.fixture
def redis_store(isolation: dict[str, str]) -> Iterator[RunStore]:
    require("Redis", "127.0.0.1", 6379)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    store = RunStore(client, isolation["STATESWEEP_KEY_PREFIX"])
    yield store
    keys = list(client.scan_iter(match=f"{store.prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def invoke(*args: str, env: dict[str, str]) -> Result:
    """The CLI with *env* its whole configuration: Airflow's variables are unset too."""
    return cli_runner.invoke(*args, env=env, unset=("STATESWEEP_", "AIRFLOW"))


def dead_database_env(isolation: dict[str, str], redis_url: str = REDIS_URL) -> dict[str, str]:
    return {**isolation, "HOME": "/nonexistent",
            "STATESWEEP_DATABASE_URL":
                f"postgresql://postgres:{SECRET}@127.0.0.1:{closed_port()}/airflow",
            "STATESWEEP_BROKER_URL": redis_url, "STATESWEEP_RESULT_BACKEND": redis_url}


def test_status_with_the_database_down_shows_the_runs_and_one_line_about_the_backlog(
        isolation: dict[str, str], redis_store: RunStore) -> None:
    start_plan(redis_store, "run-db-down", id_plan(3))
    done = invoke("status", env=dead_database_env(isolation))
    assert done.exit_code == EXIT_OK, done.output
    assert "active run: run-db-down" in done.stdout and "run-db-down  running" in done.stdout
    backlog = [line for line in done.stdout.splitlines() if line.startswith("backlog")]
    assert len(backlog) == 1
    assert backlog[0].startswith("backlog: unknown (the database STATESWEEP_DATABASE_URL="
                                 "postgresql://postgres:***@127.0.0.1:")
    assert "is unreachable: " in backlog[0] and "refused" in backlog[0]
    assert SECRET not in done.output and "Traceback" not in done.output

    as_json = invoke("status", "--format", "json", env=dead_database_env(isolation))
    assert as_json.exit_code == EXIT_OK
    data = json.loads(as_json.stdout)
    assert data["active_run_id"] == "run-db-down"
    assert "is unreachable" in data["backlog"]["error"] and SECRET not in as_json.stdout


def test_status_with_the_run_store_down_is_one_line_and_unavailable(
        isolation: dict[str, str]) -> None:
    dead_redis = f"redis://:{SECRET}@127.0.0.1:{closed_port()}/0"
    done = invoke("status", env=dead_database_env(isolation, dead_redis))
    assert done.exit_code == EXIT_UNAVAILABLE
    assert done.stderr.startswith("error: the run store STATESWEEP_RESULT_BACKEND=redis://:***@")
    assert SECRET not in done.output and "Traceback" not in done.output
