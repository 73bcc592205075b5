"""`statesweep doctor` checks what a run needs against the real services (issue 22, item 4 and
"What to build"): SELECT and DELETE on each state table (a real read-only role on PostgreSQL
and MariaDB), the expires_at index the configured planner reads, and the run store's Redis
version and maxmemory-policy (a private redis-server set to allkeys-lru; the version through
the INFO seam, there being no Redis < 7 here). Before, doctor said healthy to a read-only user
and never looked at Redis's version or policy. Each failure is one FAIL line; doctor exits 7."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import text

from tests.integration.test_cli import Seeded, invoke
from tests.integration.test_read_only_user import PASSWORD, ReadOnly, read_only_user
from tests.reliability.faults import own_redis
from tests.services import REDIS_URL
from workers.cli.doctor import run_store_check
from workers.exit_codes import EXIT_UNHEALTHY
from workers.settings import Settings
from workers.startup import redis_info

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(params=["postgresql", "mariadb"])
def read_only(request: pytest.FixtureRequest, isolation: dict[str, str]) -> Iterator[ReadOnly]:
    admin_url = request.getfixturevalue("pg_url" if request.param == "postgresql"
                                        else "mariadb_url")
    with read_only_user(request.param, admin_url, isolation) as user:
        yield user


def _checks(stdout: str, name: str) -> list[dict[str, Any]]:
    return [c for c in json.loads(stdout)["checks"] if c["name"] == name]


def _lines(stdout: str, mark: str, name: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(f"{mark}  {name}")]


def test_doctor_fails_a_read_only_user_on_each_state_table(read_only: ReadOnly) -> None:
    result = invoke("doctor", env=read_only.env)
    assert result.exit_code == EXIT_UNHEALTHY, result.output
    fails = _lines(result.stdout, "FAIL", "privileges")
    assert len(fails) == 2, result.stdout
    for line, table in zip(fails, ("task_state", "asset_state"), strict=True):
        assert f"lacks DELETE on table {table}" in line and read_only.user in line
        assert f"GRANT DELETE ON {table} TO" in line
    assert PASSWORD not in result.output
    assert _lines(result.stdout, "ok  ", "database")  # it connected: only privileges fail


def test_doctor_passes_privileges_once_granted(read_only: ReadOnly) -> None:
    read_only.grant("SELECT, DELETE")
    result = invoke("doctor", "--format", "json", env=read_only.env)
    privileges = _checks(result.stdout, "privileges")
    assert [c["status"] for c in privileges] == ["ok", "ok"], privileges
    assert "may SELECT and DELETE on task_state" in privileges[0]["detail"]


@pytest.mark.parametrize(("planner", "status"), [("auto", "fail"), ("expiry", "fail"),
                                                 ("walk", "fail"), ("ids", "fail"),
                                                 ("blocks", "warn")])
def test_doctor_checks_the_index_the_planner_reads(seeded: Seeded, planner: str,
                                                   status: str) -> None:
    ok = invoke("doctor", "--format", "json", env={**seeded.env, "STATESWEEP_PLANNER": planner})
    index = _checks(ok.stdout, "expires_at index")
    assert [c["status"] for c in index] == ["ok"], index
    assert f"which the {planner} planner uses" in index[0]["detail"]
    with seeded.engine.begin() as conn:
        conn.execute(text("DROP INDEX idx_task_state_expires_at"))
    result = invoke("doctor", "--format", "json",
                    env={**seeded.env, "STATESWEEP_PLANNER": planner})
    index = _checks(result.stdout, "expires_at index")
    assert [c["status"] for c in index] == [status], index
    assert f"STATESWEEP_PLANNER={planner}" in index[0]["detail"]
    assert "CREATE INDEX CONCURRENTLY idx_task_state_expires_at ON task_state (expires_at);" \
        in index[0]["detail"]
    assert result.exit_code == EXIT_UNHEALTHY


def test_doctor_reports_the_run_store_redis_version_and_policy(seeded: Seeded) -> None:
    result = invoke("doctor", "--format", "json", env=seeded.env)
    store = _checks(result.stdout, "run store")
    version = redis_info(REDIS_URL)["redis_version"]
    assert [c["status"] for c in store] == ["ok"], store
    assert f"(Redis {version}, maxmemory-policy noeviction)" in store[0]["detail"]


def test_doctor_fails_a_run_store_that_may_evict(seeded: Seeded) -> None:
    with own_redis(password="s3cret") as server:
        redis.Redis.from_url(server.url).config_set("maxmemory-policy", "volatile-lru")
        result = invoke("doctor", env={**seeded.env, "STATESWEEP_RUN_STORE_URL": server.url})
    assert result.exit_code == EXIT_UNHEALTHY, result.output
    fails = _lines(result.stdout, "FAIL", "run store")
    assert len(fails) == 1, result.stdout
    assert f"STATESWEEP_RUN_STORE_URL=redis://:***@127.0.0.1:{server.port}/0" in fails[0]
    assert "maxmemory-policy volatile-lru may evict" in fails[0]
    assert "s3cret" not in result.output


def test_doctor_fails_a_run_store_redis_older_than_7() -> None:
    """The real INFO of the machine's Redis with its version replaced: the one seam."""
    settings = Settings.from_env({"STATESWEEP_RUN_STORE_URL": REDIS_URL})
    checks = run_store_check(settings, lambda url: {**redis_info(url), "redis_version": "6.2.14"})
    assert [(c.name, c.status) for c in checks] == [("run store", "fail")]
    assert "Redis 6.2.14 is older than 7.0" in checks[0].detail
    assert [c.status for c in run_store_check(settings)] == ["ok"]
