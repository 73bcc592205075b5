"""The CLI configured the Airflow way, on a real PostgreSQL database: a custom state backend in
airflow.cfg makes every cleanup skip (exit 0, nothing deleted) unless STATESWEEP_STATE_BACKEND
overrides it; every bad URL is one line with the settings exit code; read-only commands create
no database file; and the CLI consistency fixes (seed arguments, one time format in JSON, cause
chains without library bookkeeping)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner, Result
from sqlalchemy.engine import make_url

from tests.conftest import seed_postgres
from tests.processes import child_env
from workers.chunk import run_local
from workers.cli import EXIT_BAD_ARGUMENT, EXIT_OK, EXIT_SCHEMA, EXIT_SETTINGS, cli
from workers.runs import registry_for
from workers.schema import resolve_tables
from workers.seed import row_count
from workers.settings import Settings

pytestmark = pytest.mark.integration

STATESWEEP = str(Path(sys.executable).with_name("statesweep"))
ROWS = 4000
CUSTOM = "company.state.RedisStateBackend"
SECRET = "Pw-airflow-5e3"


def invoke(env: dict[str, str], *args: str) -> Result:
    clean: dict[str, str | None] = {k: None for k in os.environ
                                    if k.startswith(("STATESWEEP_", "AIRFLOW"))}
    clean.update(env)
    return CliRunner().invoke(cli, list(args), env=clean, catch_exceptions=False)


def run_cli(env: dict[str, str], *args: str, cwd: Path | None = None,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STATESWEEP, *args], env=child_env(env), cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.fixture
def airflow(pg_url: str, isolation: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    """A seeded database named only in airflow.cfg, whose [state_store] backend is custom."""
    db = seed_postgres(pg_url, isolation, ROWS)
    (tmp_path / "airflow.cfg").write_text(
        f"[database]\nsql_alchemy_conn = {pg_url}\n\n[state_store]\nbackend = {CUSTOM}\n")
    env = {k: v for k, v in db.env.items() if k != "STATESWEEP_DATABASE_URL"}
    env["AIRFLOW_HOME"] = str(tmp_path)
    try:
        yield env
    finally:
        db.engine.dispose()


def rows(env: dict[str, str]) -> int:
    settings = Settings.from_env(env)
    from workers.db import make_engine

    engine = make_engine(settings.database_url)
    try:
        return row_count(engine, resolve_tables(engine))
    finally:
        engine.dispose()


# --- [state_store] backend ---------------------------------------------------------------------


@pytest.mark.parametrize("args", [("cleanup",), ("cleanup", "--wait"), ("cleanup", "--local"),
                                  ("cleanup", "--dry-run"), ("cleanup-task-states",),
                                  ("orphans", "--local")])
def test_custom_backend_in_airflow_cfg_skips_and_deletes_nothing(
        airflow: dict[str, str], args: tuple[str, ...]) -> None:
    result = invoke(airflow, *args)
    assert result.exit_code == EXIT_OK, result.stderr
    assert "custom backend configured — skipping" in result.stderr
    assert CUSTOM in result.stderr and "airflow.cfg" in result.stderr
    assert rows(airflow) == ROWS


def test_doctor_warns_that_a_custom_airflow_backend_makes_cleanup_skip(
        airflow: dict[str, str]) -> None:
    data = json.loads(invoke(airflow, "doctor", "--format", "json").stdout)
    [check] = [c for c in data["checks"] if c["name"] == "state backend"]
    assert check["status"] == "warn" and CUSTOM in check["detail"]
    assert "custom backend configured — cleanup skips" in check["detail"]


def test_statesweep_state_backend_overrides_the_custom_backend_in_airflow_cfg(
        airflow: dict[str, str]) -> None:
    env = {**airflow, "STATESWEEP_STATE_BACKEND": "workers.store.MetastoreStateBackend"}
    result = invoke(env, "cleanup", "--local", "--format", "json")
    assert result.exit_code == EXIT_OK, result.stderr
    assert "skipping" not in result.stderr
    assert json.loads(result.stdout)["rows_deleted"] > 0
    assert rows(airflow) < ROWS


def test_the_coordinator_skips_a_custom_airflow_backend_with_the_upstream_message(
        airflow: dict[str, str]) -> None:
    """What a worker's coordinator does with the same configuration (the CLI skips first)."""
    from workers.db import make_engine

    settings = Settings.from_env(airflow)
    engine = make_engine(settings.database_url)
    try:
        with structlog.testing.capture_logs() as logs:
            summary = run_local(settings, engine, resolve_tables(engine),
                                registry_for("memory://", "airflow-test"))
    finally:
        engine.dispose()
    assert summary.status == "custom_backend"
    assert [e["backend"] for e in logs
            if e["event"] == "custom backend configured; skipping"] == [CUSTOM]
    assert rows(airflow) == ROWS


# --- every bad URL: one line, settings exit code, masked, no traceback --------------------------


BAD_URLS = [
    (f"mssql+pyodbc://sa:{SECRET}@db/airflow", "scheme 'mssql' is not supported"),
    (f"postgresql+asyncpg://airflow:{SECRET}@db/airflow", "driver 'asyncpg' is not supported"),
    (f"mysql+aiomysql://airflow:{SECRET}@db/airflow", "driver 'aiomysql' is not supported"),
    (f"postgresql+psycopg2://airflow:{SECRET}@db:54x2/airflow", "is not a database URL"),
    (f"postgres://airflow:{SECRET}@db:5432/", "names no database"),
    (f"mysql+mysqldb://airflow:{SECRET}@db", "names no database"),
    # Options the mapped driver would reject at its first connection with a TypeError.
    (f"postgresql+psycopg2://airflow:{SECRET}@db/airflow?sslmod=require",
     'libpq does not know (invalid connection option "sslmod")'),
    (f"mysql+mysqldb://airflow:{SECRET}@db/airflow?ssl_mode=REQUIRED",
     "PyMySQL, statesweep's MySQL driver, does not take: ssl_mode"),
]


@pytest.mark.parametrize(("url", "says"), BAD_URLS, ids=[u.split("@")[0][:20] + "|" + s[:18]
                                                         for u, s in BAD_URLS])
@pytest.mark.parametrize("where", ["STATESWEEP_DATABASE_URL",
                                   "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "airflow.cfg"])
def test_every_bad_url_is_one_line_from_the_cli(url: str, says: str, where: str,
                                               tmp_path: Path) -> None:
    env = {"AIRFLOW_HOME": str(tmp_path), "STATESWEEP_RUN_STORE_URL": "memory://"}
    if where == "airflow.cfg":
        (tmp_path / "airflow.cfg").write_text(f"[database]\nsql_alchemy_conn = {url}\n")
    else:
        env[where] = url
    done = run_cli(env, "cleanup", "--dry-run", cwd=tmp_path)
    assert done.returncode == EXIT_SETTINGS, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert says in lines[0] and (where in lines[0])
    masked = url.replace(SECRET, "***")
    assert repr(masked) in lines[0]
    assert SECRET not in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == ([tmp_path / "airflow.cfg"] if where == "airflow.cfg"
                                        else [])


# --- read-only commands never create a database file --------------------------------------------


@pytest.mark.parametrize("args", [("cleanup", "--dry-run"), ("orphans", "--dry-run"),
                                  ("doctor",), ("status",)])
def test_read_only_commands_never_create_a_sqlite_file(args: tuple[str, ...], tmp_path: Path,
                                                        isolation: dict[str, str]) -> None:
    """Issue: with no database configured, `cleanup --dry-run` created an empty statesweep.db
    in the current directory, then said the tables were missing."""
    env = {**isolation, "AIRFLOW_HOME": str(tmp_path / "airflow")}
    done = run_cli(env, *args, cwd=tmp_path)
    assert not (tmp_path / "statesweep.db").exists(), done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []
    output = done.stdout + done.stderr
    assert "statesweep.db does not exist" in output, output
    assert "the default: no STATESWEEP_DATABASE_URL or Airflow sql_alchemy_conn is set" in output
    if args[0] == "cleanup" or args[0] == "orphans":
        assert done.returncode == EXIT_SCHEMA, output
    assert "Traceback" not in output


def test_database_errors_name_where_the_url_came_from(pg_url: str, tmp_path: Path) -> None:
    dead = make_url(pg_url).set(port=1, password=SECRET).render_as_string(hide_password=False)
    (tmp_path / "airflow.cfg").write_text(f"[database]\nsql_alchemy_conn = {dead}\n")
    done = run_cli({"AIRFLOW_HOME": str(tmp_path)}, "cleanup", "--dry-run")
    first = done.stderr.splitlines()[0]
    assert "is unreachable" in first and ":***@127.0.0.1:1/" in first
    assert f"(from airflow.cfg {tmp_path / 'airflow.cfg'} [database] sql_alchemy_conn)" in first
    assert SECRET not in done.stderr


# --- CLI consistency -------------------------------------------------------------------------


def test_seed_with_negative_rows_exits_with_the_bad_argument_code(tmp_path: Path) -> None:
    done = run_cli({"STATESWEEP_DATABASE_URL": f"sqlite:///{tmp_path / 's.db'}"},
                   "seed", "--rows", "-1")
    assert done.returncode == EXIT_BAD_ARGUMENT, done.stderr
    assert "--rows must be 0 or a positive number of rows, got -1" in done.stderr
    assert not (tmp_path / "s.db").exists()
    demo = run_cli({}, "demo", "--rows", "-5", cwd=tmp_path)
    assert demo.returncode == EXIT_BAD_ARGUMENT, demo.stderr


def test_status_json_uses_iso_8601_utc_for_every_time(airflow: dict[str, str]) -> None:
    env = {**airflow, "STATESWEEP_STATE_BACKEND": "workers.store.MetastoreStateBackend"}
    local = invoke(env, "cleanup", "--local", "--format", "json")
    assert local.exit_code == EXIT_OK, local.stderr
    run = json.loads(local.stdout)
    overview = json.loads(invoke(env, "status", "--format", "json").stdout)
    one = json.loads(invoke(env, "status", run["run_id"], "--format", "json").stdout)
    times = {"backlog.now": overview["backlog"]["now"]}
    for name, record in (("cleanup", run), ("status", overview["runs"][0]), ("status id", one)):
        times.update({f"{name}.{k}": v for k, v in record.items()
                      if k.endswith("_at") or k == "cutoff"})
    assert len(times) >= 10
    for name, value in times.items():
        if value is None:  # a time not reached (e.g. no chunk progress recorded)
            continue
        assert isinstance(value, str), f"{name} = {value!r}"
        parsed = dt.datetime.fromisoformat(value)
        assert parsed.utcoffset() == dt.timedelta(0), f"{name} = {value!r}"
    assert run["started_at"] <= run["finished_at"]


def test_cause_chain_shows_what_explains_not_library_bookkeeping(
        capsys: pytest.CaptureFixture[str]) -> None:
    """kombu's own chain for a dead Redis ends in `IndexError: pop from empty list` (its
    channel pool); that says nothing about why, so it is not shown."""
    from kombu import Connection

    from workers.cli.base import explaining_causes, report

    conn = Connection("redis://127.0.0.1:1/0", connect_timeout=1)
    try:
        with pytest.raises(Exception) as err:
            conn.default_channel  # noqa: B018 - connects
    finally:
        conn.release()
    chain, everything = explaining_causes(err.value), []
    cause: BaseException | None = err.value
    while cause is not None:
        everything.append(type(cause).__name__)
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    assert "IndexError" in everything  # the noise is really there
    assert "ConnectionRefusedError" in [type(c).__name__ for c in chain]
    assert not any(isinstance(c, IndexError) for c in chain)
    report(err.value)
    out = capsys.readouterr().err
    assert "Connection refused" in out and "pop from empty list" not in out


def test_doctor_shows_where_each_setting_came_from_with_secrets_masked(
        pg_url: str, isolation: dict[str, str], tmp_path: Path) -> None:
    from tests.services import REDIS_URL

    with_password = make_url(pg_url).set(password=SECRET).render_as_string(hide_password=False)
    cfg = tmp_path / "airflow.cfg"
    cfg.write_text(f"[database]\nsql_alchemy_conn_cmd = echo {with_password}\n\n"
                   "[state_store]\ndefault_retention_days = 12\n")
    env = {**isolation, "STATESWEEP_BROKER_URL": REDIS_URL, "STATESWEEP_RESULT_BACKEND": REDIS_URL,
           "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE": "77"}
    text = run_cli(env, "doctor")
    assert f"airflow.cfg: {cfg} (read)" in text.stdout, text.stdout + text.stderr
    rows = {line.split(" = ")[0].strip(): line for line in text.stdout.splitlines()
            if " = " in line}
    assert rows["database_url"].endswith(f"[airflow.cfg {cfg} [database] sql_alchemy_conn_cmd]")
    assert ":***@" in rows["database_url"]
    assert rows["default_retention_days"].endswith(
        f"[airflow.cfg {cfg} [state_store] default_retention_days]")
    assert "= 77 " in rows["cleanup_batch_size"]
    assert rows["cleanup_batch_size"].endswith("[AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE]")
    assert rows["broker_url"].endswith("[STATESWEEP_BROKER_URL]")
    assert rows["log_level"].endswith("[default]")
    as_json = json.loads(run_cli(env, "doctor", "--format", "json").stdout)
    assert as_json["sources"]["cleanup_batch_size"] == (
        "AIRFLOW__STATE_STORE__STATE_CLEANUP_BATCH_SIZE")
    assert SECRET not in text.stdout + text.stderr


def test_a_tls_option_naming_a_missing_file_is_a_clear_error(mariadb_url: str,
                                                             tmp_path: Path) -> None:
    """PyMySQL opens ssl_ca while connecting: a missing file was a FileNotFoundError
    traceback; it is the database named as unreachable, with the cause."""
    from workers.cli import EXIT_UNAVAILABLE

    url = mariadb_url.replace("mysql://", "mysql+mysqldb://") + f"?ssl_ca={tmp_path}/no-ca.pem"
    done = run_cli({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url, "AIRFLOW_HOME": str(tmp_path)},
                   "cleanup", "--dry-run")
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    assert done.stderr.startswith("error: the database AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=")
    assert "caused by FileNotFoundError" in done.stderr and "Traceback" not in done.stderr
