"""`statesweep seed` (compose's demo-data profile) fills only a schema statesweep created."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from tests.conftest import create_schema
from workers.cli import EXIT_OK, EXIT_REFUSED, main
from workers.db import make_engine
from workers.schema import build_tables
from workers.seed import SeedSpec, row_count

pytestmark = pytest.mark.integration


def run(monkeypatch: pytest.MonkeyPatch, url: str, *args: str) -> int:
    monkeypatch.setenv("STATESWEEP_DATABASE_URL", url)
    with pytest.raises(SystemExit) as exit_:
        main(["seed", *args])
    return int(exit_.value.code or 0)


def test_seeds_the_standalone_schema_once(db_url: str, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    engine, tables = create_schema(db_url)
    try:
        assert run(monkeypatch, db_url, "--rows=1000") == EXIT_OK
        counts = json.loads(capsys.readouterr().out)
        spec = SeedSpec(rows=1000)
        assert counts["rows"] == row_count(engine, tables) == 1000
        assert counts["expired"] == 1000 * spec.expired_per_period // spec.period

        # Again: refused without --if-empty, a quiet no-op with it; nothing added either way.
        assert run(monkeypatch, db_url, "--rows=1000") == EXIT_REFUSED
        assert "already holds data" in capsys.readouterr().err
        assert run(monkeypatch, db_url, "--rows=1000", "--if-empty") == EXIT_OK
        assert "nothing to do" in capsys.readouterr().err
        assert row_count(engine, tables) == 1000
    finally:
        engine.dispose()


def test_refuses_a_database_statesweep_did_not_create(
        pg_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The test server trusts local connections, so the password only has to stay unprinted.
    url = make_url(pg_url).set(password="hunter2").render_as_string(hide_password=False)
    engine = make_engine(url)
    build_tables("seed").metadata.create_all(engine)  # right tables, but no statesweep marker
    try:
        assert run(monkeypatch, url, "--rows=10", "--if-empty") == EXIT_REFUSED
        err = capsys.readouterr().err
        assert "run 'statesweep db upgrade' first" in err
        assert "hunter2" not in err and ":***@" in err
        assert row_count(engine, build_tables("seed")) == 0
    finally:
        engine.dispose()


def test_refuses_an_airflow_database(sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    engine, _ = create_schema(sqlite_url, "airflow")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
    try:
        assert run(monkeypatch, sqlite_url, "--rows=10") == EXIT_REFUSED
        err = capsys.readouterr().err
        assert "holds an Airflow schema (found alembic_version)" in err
        assert row_count(engine, build_tables("airflow")) == 0
        assert "alembic_version" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_seed_adds_rows_to_a_database_it_created(db_url: str, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Issue: a seeded database could not be given more rows (refused without --if-empty,
    a no-op with it)."""
    from workers.seed import expected_survivors, task_state_rows

    engine, tables = create_schema(db_url)
    try:
        assert run(monkeypatch, db_url, "--rows=1000") == EXIT_OK
        capsys.readouterr()
        assert run(monkeypatch, db_url, "--rows=500", "--add") == EXIT_OK
        added = json.loads(capsys.readouterr().out)
        assert (added["rows"], added["first_id"]) == (500, 1001)
        assert row_count(engine, tables) == 1500
        spec = SeedSpec(rows=1500)
        assert added["expired"] == sum(1 for i in range(1000, 1500) if i % 20 < 11)
        # The rows are exactly what one seed of 1500 would have written.
        ids = {i for i, _ in task_state_rows(engine, tables)}
        assert ids == set(range(1, 1501))
        assert len(expected_survivors(spec)) == 1500 - 1500 * 11 // 20
        assert run(monkeypatch, db_url, "--rows=1", "--add", "--if-empty") != EXIT_OK
    finally:
        engine.dispose()
