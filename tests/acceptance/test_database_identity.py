"""The CLI and the workers agree on the database before a run is planned (issue 22, item 2): a
CLI pointed at another database than the workers' is refused with both named and nothing
deleted in either; a URL naming no database, or one without the state tables, is one line
and nothing is sent; a run records the database it cleaned and `status` shows it. Real
PostgreSQL, Redis and a `celery -A workers worker` subprocess (tests/acceptance)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url

from tests.acceptance.test_cli_worker import STATESWEEP, Deployment
from tests.conftest import seed_postgres
from tests.processes import ROOT, child_env
from tests.services import fresh_postgres_database
from workers.cli import EXIT_OK
from workers.exit_codes import EXIT_REFUSED, EXIT_SCHEMA, EXIT_UNHEALTHY

pytestmark = pytest.mark.acceptance


@pytest.fixture
def other_database(isolation: dict[str, str]) -> Iterator[str]:
    """A second seeded database on the same server, with expired rows of its own."""
    with fresh_postgres_database() as url:
        db = seed_postgres(url, isolation, 2_000)
        db.engine.dispose()
        yield url


def statesweep(deployment: Deployment, *args: str,
               database_url: str) -> subprocess.CompletedProcess[str]:
    """The CLI with the deployment's settings but another STATESWEEP_DATABASE_URL."""
    env = child_env({**deployment.env, "STATESWEEP_DATABASE_URL": database_url})
    return subprocess.run([STATESWEEP, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


def _other_rows(url: str) -> int:
    from workers import seed
    from workers.db import make_engine
    from workers.schema import build_tables

    engine = make_engine(url)
    try:
        return seed.row_count(engine, build_tables("seed"))
    finally:
        engine.dispose()


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error")]


def test_a_cli_on_another_database_is_refused_naming_both(
        deployment: Deployment, other_database: str) -> None:
    url = other_database
    before_workers, before_other = deployment.rows(), _other_rows(url)
    cli_db = make_url(url).database
    workers_db = make_url(deployment.env["STATESWEEP_DATABASE_URL"]).database

    done = statesweep(deployment, "cleanup", "--wait", database_url=url)

    assert done.returncode == EXIT_REFUSED, done.stdout + done.stderr
    [error] = _errors(done.stderr)
    assert f"database '{cli_db}'" in error and f"database '{workers_db}'" in error, error
    assert "Traceback" not in done.stderr
    assert deployment.rows() == before_workers and _other_rows(url) == before_other
    run_id = re.search(r"run (\S+) was not started", error)
    assert run_id, error
    shown = deployment.statesweep("status", run_id.group(1), "--format", "json")
    record = json.loads(shown.stdout)
    assert record["state"] == "skipped" and cli_db in record["error"], record
    assert record["rows_deleted"] == 0

    swept = statesweep(deployment, "orphans", "--wait", database_url=url)
    assert swept.returncode == EXIT_REFUSED, swept.stdout + swept.stderr
    [error] = _errors(swept.stderr)
    assert f"database '{cli_db}'" in error and f"database '{workers_db}'" in error, error
    assert deployment.rows() == before_workers and _other_rows(url) == before_other


def test_a_database_that_does_not_exist_is_one_line_and_nothing_is_sent(
        deployment: Deployment) -> None:
    before = deployment.rows()
    missing = make_url(deployment.env["STATESWEEP_DATABASE_URL"]).set(
        database="sw_no_such_db", password="s3cret-pw").render_as_string(hide_password=False)
    for command in (("cleanup", "--wait"), ("orphans",)):
        done = statesweep(deployment, *command, database_url=missing)
        assert done.returncode == EXIT_SCHEMA, done.stdout + done.stderr
        assert done.stderr.strip().count("\n") == 0, done.stderr
        assert "sw_no_such_db" in done.stderr and "does not exist" in done.stderr
        assert "s3cret-pw" not in done.stderr and "***" in done.stderr
        assert "dispatched" not in done.stderr
    assert deployment.rows() == before


def test_a_database_without_state_tables_is_one_line(deployment: Deployment) -> None:
    with fresh_postgres_database() as empty:
        done = statesweep(deployment, "cleanup", "--wait", database_url=empty)
    assert done.returncode == EXIT_SCHEMA, done.stdout + done.stderr
    [error] = done.stderr.strip().splitlines()
    assert "holds no task_state or task_state_store table" in error
    assert "finished" not in done.stdout + done.stderr


def test_a_run_records_the_database_it_cleaned(deployment: Deployment) -> None:
    done = deployment.statesweep("cleanup", "--wait", "--format", "json")
    assert done.returncode == EXIT_OK, done.stderr
    run = json.loads(done.stdout)
    workers_db = make_url(deployment.env["STATESWEEP_DATABASE_URL"]).database
    assert run["database"].startswith(f"database '{workers_db}' on postgresql server ")
    assert run["database"].endswith("tables task_state, asset_state")
    shown = deployment.statesweep("status", run["run_id"])
    assert f"database      {run['database']}" in shown.stdout



def test_doctor_compares_the_workers_database_with_its_own(
        deployment: Deployment, other_database: str) -> None:
    workers_db = make_url(deployment.env["STATESWEEP_DATABASE_URL"]).database
    same = deployment.statesweep("doctor")
    assert same.returncode == EXIT_OK, same.stdout
    assert re.search(rf"^ok +worker database +w1@\S+ cleans database '{workers_db}' on "
                     r"postgresql server \d+, tables task_state, asset_state$",
                     same.stdout, re.MULTILINE), same.stdout

    other = statesweep(deployment, "doctor", database_url=other_database)
    assert other.returncode == EXIT_UNHEALTHY, other.stdout
    [line] = [ln for ln in other.stdout.splitlines() if "worker database" in ln]
    assert line.startswith("FAIL")
    assert f"database '{workers_db}'" in line
    assert f"database '{make_url(other_database).database}'" in line
