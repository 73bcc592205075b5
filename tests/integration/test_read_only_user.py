"""A read-only database user (issue 22, item 4), with real roles on PostgreSQL
(CREATE ROLE ... LOGIN; GRANT SELECT) and MariaDB (CREATE USER ...; GRANT SELECT).

Before, `cleanup --local` and `orphans --local` printed a 79-line traceback (PostgreSQL's
InsufficientPrivilege as SQLAlchemy's ProgrammingError was mapped to no exit code) or, on
MariaDB, "unreachable" with exit 8. Now: one line naming the user, the privilege, the table and
the GRANT to run, exit 4, nothing deleted; a worker on such a user refuses to start."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from tests.conftest import create_schema, database_now
from tests.processes import CELERY, ROOT, child_env, start_worker
from tests.services import REDIS_URL, require
from workers.cli.base import exit_for
from workers.db import make_engine
from workers.exit_codes import EXIT_OK, EXIT_SCHEMA
from workers.privileges import denied, missing_privileges
from workers.schema import Tables
from workers.seed import SeedSpec, seed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

STATESWEEP = str(Path(CELERY).with_name("statesweep"))
PASSWORD = "r3adonly-pw"


@dataclass
class ReadOnly:
    dialect: str
    user: str
    url: str  # the read-only user's URL
    env: dict[str, str]
    engine: Engine  # the owner's
    tables: Tables

    def counts(self) -> tuple[int, int]:
        with self.engine.connect() as conn:
            return (conn.execute(select(func.count()).select_from(self.tables.task_state))
                    .scalar_one(),
                    conn.execute(select(func.count()).select_from(self.tables.asset_state))
                    .scalar_one())

    def grant(self, privileges: str) -> None:
        with self.engine.begin() as conn:
            for table in (self.tables.task_state.name, self.tables.asset_state.name):
                conn.execute(text(f"GRANT {privileges} ON {table} TO {self.grantee}"))

    @property
    def grantee(self) -> str:
        return f'"{self.user}"' if self.dialect == "postgresql" else f"'{self.user}'@'%'"


@pytest.fixture(params=["postgresql", "mariadb"])
def read_only(request: pytest.FixtureRequest, isolation: dict[str, str]) -> Iterator[ReadOnly]:
    """A seeded database on each dialect, and a user that may only SELECT from it."""
    require("Redis", "127.0.0.1", 6379)
    admin_url = request.getfixturevalue("pg_url" if request.param == "postgresql"
                                        else "mariadb_url")
    with read_only_user(request.param, admin_url, isolation) as user:
        yield user


@contextmanager
def read_only_user(dialect: str, admin_url: str,
                   isolation: dict[str, str]) -> Iterator[ReadOnly]:
    engine, tables = create_schema(admin_url)
    seed(engine, tables, SeedSpec(rows=2000), database_now(engine))
    user = f"sw_ro_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        if dialect == "postgresql":
            conn.execute(text(f"CREATE ROLE \"{user}\" LOGIN PASSWORD '{PASSWORD}'"))
            conn.execute(text(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{user}"'))
        else:
            database = make_url(admin_url).database
            conn.execute(text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{PASSWORD}'"))
            conn.execute(text(f"GRANT SELECT ON `{database}`.* TO '{user}'@'%'"))
    url = make_url(admin_url).set(username=user, password=PASSWORD).render_as_string(
        hide_password=False)
    env = {"STATESWEEP_DATABASE_URL": url, "STATESWEEP_BROKER_URL": REDIS_URL,
           "STATESWEEP_RESULT_BACKEND": REDIS_URL, **isolation}
    try:
        yield ReadOnly(dialect, user, url, env, engine, tables)
    finally:
        with engine.begin() as conn:
            if dialect == "postgresql":
                conn.execute(text(f'DROP OWNED BY "{user}"'))
                conn.execute(text(f'DROP ROLE "{user}"'))
            else:
                conn.execute(text(f"DROP USER '{user}'@'%'"))
        engine.dispose()


def _one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.parametrize(("command", "table"), [(["cleanup", "--local"], "task_state"),
                                                (["orphans", "--local"], "asset_state")])
def test_local_runs_say_which_privilege_is_missing_and_delete_nothing(
        read_only: ReadOnly, command: list[str], table: str) -> None:
    before = read_only.counts()
    run = subprocess.run([STATESWEEP, *command], cwd=ROOT, env=child_env(read_only.env),
                         capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert run.returncode == EXIT_SCHEMA, output
    line = _one_line(output)
    assert f"lacks DELETE on table {table}" in line, line
    assert read_only.user in line and "nothing was deleted" in line
    assert f"GRANT DELETE ON {table} TO" in line
    assert "Traceback" not in output and PASSWORD not in output, output
    assert read_only.counts() == before


def test_a_worker_on_a_read_only_user_refuses_to_start(read_only: ReadOnly,
                                                       tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as refused:
        start_worker(read_only.env, tmp_path, "ro", ready_timeout=30).stop()
    output = str(refused.value)
    assert f"exited with {EXIT_SCHEMA}" in output, output
    lines = [line for line in output.splitlines() if "worker not started" in line]
    assert len(lines) == 1, output
    assert "lacks DELETE on table task_state, DELETE on table asset_state" in lines[0]
    assert PASSWORD not in output and "Traceback" not in output


def test_a_denied_statement_maps_to_one_line_and_exit_4(read_only: ReadOnly) -> None:
    """A grant revoked after the check: the error a real DELETE raises, not a preflight's."""
    engine = make_engine(read_only.url)
    try:
        with pytest.raises(DBAPIError) as err, engine.begin() as conn:
            conn.execute(read_only.tables.task_state.delete().where(text("1 = 0")))
    finally:
        engine.dispose()
    assert exit_for(err.value) == EXIT_SCHEMA
    line = denied(err.value, read_only.user)
    assert line is not None and "\n" not in line
    assert f"'{read_only.user}" in line and "lacks DELETE on table task_state" in line


def test_the_checks_pass_once_select_and_delete_are_granted(read_only: ReadOnly) -> None:
    engine = make_engine(read_only.url)
    try:
        tables = [read_only.tables.task_state, read_only.tables.asset_state]
        assert {(m.privilege, m.table) for m in missing_privileges(engine, tables)} == {
            ("DELETE", "task_state"), ("DELETE", "asset_state")}
        read_only.grant("SELECT, DELETE")
        assert missing_privileges(engine, tables) == []
    finally:
        engine.dispose()
    run = subprocess.run([STATESWEEP, "orphans", "--local"], cwd=ROOT,
                         env=child_env(read_only.env), capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == EXIT_OK, run.stdout + run.stderr
