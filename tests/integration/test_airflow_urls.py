"""Airflow's connection strings, as Airflow's documentation writes them, reach a real Airflow
database (3.3 and 3.4, made by `airflow db migrate`) on PostgreSQL and MariaDB (and a standalone
SQLite file) through the drivers statesweep installs: `statesweep cleanup --local` given only
AIRFLOW__DATABASE__SQL_ALCHEMY_CONN deletes exactly the expired rows, and the URL's query
options reach the server."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.airflow_schemas import VERSIONS, airflow_schema_database
from tests.airflow_schemas.rows import seed_airflow
from tests.conftest import database_now
from workers.cli import EXIT_OK, cli
from workers.db import make_engine, normalise_url
from workers.schema import resolve_tables, upgrade
from workers.seed import SeedSpec, expected_survivors, seed, task_state_rows

pytestmark = pytest.mark.integration

SPEC = SeedSpec(rows=600)
# (dialect, scheme as Airflow's docs spell it, query options Airflow users set)
SPELLINGS = [
    ("postgresql", "postgresql+psycopg2", "sslmode=disable&connect_timeout=10"),
    ("postgresql", "postgres", "sslmode=prefer"),
    ("postgresql", "postgresql+psycopg", "connect_timeout=5"),
    ("postgresql", "postgresql", ""),
    ("mariadb", "mysql+mysqldb", "charset=utf8mb4"),
    ("mariadb", "mysql+mysqlconnector", "connect_timeout=10"),
    ("mariadb", "mysql+pymysql", "charset=utf8mb4&connect_timeout=10"),
]


def invoke(env: dict[str, str], *args: str) -> Result:
    clean: dict[str, str | None] = {k: None for k in os.environ
                                    if k.startswith(("STATESWEEP_", "AIRFLOW"))}
    clean.update(env)
    return CliRunner().invoke(cli, list(args), env=clean, catch_exceptions=False)


def spelled(url: str, scheme: str, query: str) -> str:
    """*url* rewritten with Airflow's *scheme* and *query* options."""
    rest = url.split("://", 1)[1]
    return f"{scheme}://{rest}" + (f"?{query}" if query else "")


@pytest.fixture
def airflow_home(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An AIRFLOW_HOME with no airflow.cfg, and the rest statesweep needs for a local run."""
    yield {"AIRFLOW_HOME": str(tmp_path), "STATESWEEP_RUN_STORE_URL": "memory://"}


@pytest.mark.parametrize("version", [v for v, _ in VERSIONS])
@pytest.mark.parametrize(("dialect", "scheme", "query"), SPELLINGS,
                         ids=[f"{s}?{q}" if q else s for _, s, q in SPELLINGS])
def test_airflow_spelling_reaches_a_real_airflow_database(
        dialect: str, scheme: str, query: str, version: str,
        airflow_home: dict[str, str]) -> None:
    with airflow_schema_database(dialect, version) as url:
        engine = make_engine(url)
        try:
            tables = resolve_tables(engine)
            seed_airflow(engine, tables, SPEC, database_now(engine))
            conn_string = spelled(url, scheme, query)
            result = invoke({**airflow_home, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": conn_string},
                            "cleanup", "--local", "--format", "json")
            assert result.exit_code == EXIT_OK, result.output + result.stderr
            record = json.loads(result.stdout)
            assert record["state"] == "finished"
            assert task_state_rows(engine, tables) == expected_survivors(SPEC)
            assert record["rows_deleted"] == SPEC.rows - len(expected_survivors(SPEC))
        finally:
            engine.dispose()


@pytest.mark.parametrize(("scheme", "query", "probe", "expected"), [
    ("postgresql+psycopg2", "options=-c%20statement_timeout%3D4321",
     "SHOW statement_timeout", "4321ms"),
    ("postgres", "application_name=sw_probe&sslmode=disable",
     "SELECT current_setting('application_name')", "sw_probe"),
])
def test_postgres_query_options_reach_the_server(scheme: str, query: str, probe: str,
                                                 expected: str, pg_url: str) -> None:
    engine = make_engine(spelled(pg_url, scheme, query))
    try:
        with engine.connect() as conn:
            assert conn.execute(text(probe)).scalar_one() == expected
        assert engine.url.drivername == "postgresql+psycopg"
    finally:
        engine.dispose()


@pytest.mark.parametrize("scheme", ["mysql+mysqldb", "mysql+mysqlconnector", "mysql"])
def test_mysql_query_options_reach_the_server(scheme: str, mariadb_url: str) -> None:
    engine = make_engine(spelled(mariadb_url, scheme, "charset=latin1"))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT @@character_set_client")).scalar_one() == "latin1"
        assert engine.url.drivername == "mysql+pymysql"
    finally:
        engine.dispose()


def test_sqlite_spelling_reaches_a_standalone_file(tmp_path: Path,
                                                   airflow_home: dict[str, str]) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    engine = make_engine(url)
    try:
        upgrade(engine, "airflow")
        tables = resolve_tables(engine)
        seed(engine, tables, SPEC, database_now(engine))
        result = invoke({**airflow_home, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url},
                        "cleanup", "--local", "--format", "json")
        assert result.exit_code == EXIT_OK, result.output + result.stderr
        assert task_state_rows(engine, tables) == expected_survivors(SPEC)
    finally:
        engine.dispose()


def test_normalised_url_keeps_every_query_option() -> None:
    url = ("postgresql+psycopg2://u:pw@h:5433/airflow?sslmode=verify-full"
           "&sslrootcert=/etc/ca.pem&connect_timeout=7&options=-c%20search_path%3Dairflow")
    u = make_url(normalise_url(url))
    assert u.drivername == "postgresql+psycopg"
    assert (u.username, u.password, u.host, u.port, u.database) == ("u", "pw", "h", 5433,
                                                                    "airflow")
    assert dict(u.query) == {"sslmode": "verify-full", "sslrootcert": "/etc/ca.pem",
                             "connect_timeout": "7", "options": "-c search_path=airflow"}
