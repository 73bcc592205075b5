"""workers.identity on each dialect (issue 22, item 2): the database's name and its state
tables in either naming, the server as the server names itself, one query; the same database
reads the same identity through two engines, another database does not."""

from __future__ import annotations

import json

from sqlalchemy.engine import make_url

from tests.conftest import create_schema
from tests.integration.test_cli import Seeded
from workers.db import make_engine
from workers.identity import DatabaseIdentity, read_identity
from workers.schema import TABLE_NAMES


def identity(url: str, naming: str = "auto") -> DatabaseIdentity:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return read_identity(conn, naming)
    finally:
        engine.dispose()


def test_identity_names_the_database_and_its_state_tables(db_url: str, naming: str) -> None:
    empty = identity(db_url)
    assert empty.tables == ""
    engine, _ = create_schema(db_url, naming)
    engine.dispose()

    found = identity(db_url)
    task, asset = TABLE_NAMES[naming]
    assert found.tables == f"{task}, {asset}" and identity(db_url, naming) == found
    assert found.server == empty.server and found == identity(db_url)
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        assert found.database == "main" and found.server.endswith(str(url.database))
    else:
        assert found.database == url.database
        assert found.server.startswith(("postgresql server ", "mariadb server ",
                                        "mysql server "))
    assert DatabaseIdentity.decode(found.encode()) == found


def test_another_database_on_the_same_server_is_another_identity(pg_url: str) -> None:
    from tests.services import fresh_postgres_database

    create_schema(pg_url)[0].dispose()
    with fresh_postgres_database() as other:
        create_schema(other)[0].dispose()
        a, b = identity(pg_url), identity(other)
    assert a.server == b.server and a.tables == b.tables
    assert a != b and a.database != b.database


def test_a_local_run_records_the_database_it_cleaned(seeded: Seeded) -> None:
    result = seeded.invoke("cleanup", "--local", "--format", "json")
    assert result.exit_code == 0, result.stderr
    run = json.loads(result.stdout)
    name = make_url(seeded.env["STATESWEEP_DATABASE_URL"]).database
    assert run["database"] == str(identity(seeded.env["STATESWEEP_DATABASE_URL"]))
    assert run["database"].startswith(f"database '{name}' on ")
    shown = seeded.invoke("status", run["run_id"])
    assert f"database      {run['database']}" in shown.stdout
