"""A simulated Airflow 3.3 metadata database, built with plain DDL, for tests that must prove
statesweep works on a database it does not own and leaves its schema exactly as it found it.

It holds what statesweep reads plus the neighbours that mark it as Airflow's: ``alembic_version``,
``dag``, ``dag_run`` (with Airflow's extra columns), ``task_instance`` (FK to dag_run),
``task_state_store`` / ``asset_state_store`` under Airflow's constraint and index names, ``asset``
(with group, extra, created_at, updated_at) and ``asset_active`` (FK to asset). The index and
unique-constraint names and the column order deliberately differ from statesweep's own
``build_tables('airflow')``, so a test passes only if statesweep relies on column names alone.

PostgreSQL and MySQL/MariaDB, as Airflow supports them. On MySQL timestamps are TIMESTAMP(6), as
Airflow's UtcDateTime makes them there, so session time-zone handling matters.

Where Airflow fills a NOT NULL column from Python (dag_run.run_type, asset.group, ...), the DDL
gives it a server default instead, so ``workers.seed.seed`` can fill this database with only the
columns statesweep knows. statesweep itself never inserts into dag_run or asset.

    with airflow_database("postgresql") as url:      # a fresh database with the schema
        engine = make_engine(url)
        before = schema_fingerprint(engine)
        ...
        assert schema_fingerprint(engine) == before
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.engine import make_url

from tests.services import fresh_mariadb_database, fresh_postgres_database
from workers.db import make_engine

#: An Alembic revision id as Airflow records it; any value marks the database as Airflow's.
ALEMBIC_REVISION = "5a4c1f0e33d7"

AIRFLOW_TABLES = ("alembic_version", "dag", "dag_run", "task_instance", "asset", "asset_active",
                  "task_state_store", "asset_state_store")

# {placeholders} are filled per dialect by _render; the DDL is otherwise shared.
_DDL = (
    """CREATE TABLE alembic_version (
        version_num VARCHAR(32) NOT NULL,
        CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)){opts}""",
    """CREATE TABLE dag (
        dag_id VARCHAR(250) NOT NULL,
        is_paused BOOLEAN,
        is_stale BOOLEAN,
        last_parsed_time {ts} NULL,
        fileloc VARCHAR(2000),
        bundle_name VARCHAR(250),
        owners VARCHAR(2000),
        description TEXT,
        max_active_tasks INTEGER NOT NULL DEFAULT 16,
        max_active_runs INTEGER,
        has_task_concurrency_limits BOOLEAN NOT NULL DEFAULT FALSE,
        CONSTRAINT dag_pkey PRIMARY KEY (dag_id)){opts}""",
    """CREATE TABLE dag_run (
        id {serial},
        dag_id VARCHAR(250) NOT NULL,
        queued_at {ts} NULL,
        logical_date {ts} NULL,
        start_date {ts} NULL,
        end_date {ts} NULL,
        state VARCHAR(50),
        run_id VARCHAR(250) NOT NULL,
        creating_job_id INTEGER,
        run_type VARCHAR(50) NOT NULL DEFAULT 'manual',
        triggered_by VARCHAR(50),
        conf {json} NULL,
        data_interval_start {ts} NULL,
        data_interval_end {ts} NULL,
        run_after {ts} NOT NULL DEFAULT {now},
        last_scheduling_decision {ts} NULL,
        log_template_id INTEGER,
        updated_at {ts} NULL,
        clear_number INTEGER NOT NULL DEFAULT 0,
        backfill_id INTEGER,
        bundle_version VARCHAR(250),
        span_status VARCHAR(250) NOT NULL DEFAULT 'not_started',
        CONSTRAINT dag_run_pkey PRIMARY KEY (id),
        CONSTRAINT dag_run_dag_id_run_id_key UNIQUE (dag_id, run_id),
        CONSTRAINT dag_run_dag_id_logical_date_key UNIQUE (dag_id, logical_date)){opts}""",
    "CREATE INDEX dag_id_state ON dag_run (dag_id, state)",
    "CREATE INDEX idx_dag_run_run_after ON dag_run (run_after)",
    """CREATE TABLE task_instance (
        id {uuid} NOT NULL,
        task_id VARCHAR(250) NOT NULL,
        dag_id VARCHAR(250) NOT NULL,
        run_id VARCHAR(250) NOT NULL,
        map_index INTEGER NOT NULL DEFAULT -1,
        start_date {ts} NULL,
        end_date {ts} NULL,
        state VARCHAR(20),
        try_number INTEGER,
        pool VARCHAR(256) NOT NULL DEFAULT 'default_pool',
        pool_slots INTEGER NOT NULL DEFAULT 1,
        CONSTRAINT task_instance_pkey PRIMARY KEY (id),
        CONSTRAINT task_instance_composite_key UNIQUE (dag_id, task_id, run_id, map_index),
        CONSTRAINT task_instance_dag_run_fkey FOREIGN KEY (dag_id, run_id)
            REFERENCES dag_run (dag_id, run_id) ON DELETE CASCADE){opts}""",
    """CREATE TABLE asset (
        id {serial},
        name {name} NOT NULL,
        uri {name} NOT NULL,
        {group} {name} NOT NULL DEFAULT '',
        extra {json} NOT NULL DEFAULT '{{}}',
        created_at {ts} NOT NULL DEFAULT {now},
        updated_at {ts} NOT NULL DEFAULT {now},
        CONSTRAINT asset_pkey PRIMARY KEY (id)){opts}""",
    "CREATE UNIQUE INDEX idx_asset_name_uri_unique ON asset (name, uri)",
    """CREATE TABLE asset_active (
        name {name} NOT NULL,
        uri {name} NOT NULL,
        CONSTRAINT asset_active_pkey PRIMARY KEY (name, uri),
        CONSTRAINT asset_active_asset_name_uri_fkey FOREIGN KEY (name, uri)
            REFERENCES asset (name, uri) ON DELETE CASCADE){opts}""",
    "CREATE UNIQUE INDEX idx_asset_active_name_unique ON asset_active (name)",
    "CREATE UNIQUE INDEX idx_asset_active_uri_unique ON asset_active (uri)",
    # Column order differs from statesweep's own table on purpose (see the module docstring).
    """CREATE TABLE task_state_store (
        id {serial},
        dag_id VARCHAR(250) NOT NULL,
        run_id VARCHAR(250) NOT NULL,
        dag_run_id INTEGER NOT NULL,
        task_id VARCHAR(250) NOT NULL,
        map_index INTEGER NOT NULL DEFAULT -1,
        {key} VARCHAR(250) NOT NULL,
        {value} TEXT NOT NULL,
        expires_at {ts} NULL,
        updated_at {ts} NOT NULL DEFAULT {now},
        CONSTRAINT task_state_store_pkey PRIMARY KEY (id),
        CONSTRAINT task_state_store_dag_run_id_fkey FOREIGN KEY (dag_run_id)
            REFERENCES dag_run (id) ON DELETE CASCADE,
        CONSTRAINT task_state_store_dag_run_id_task_id_map_index_key_uq
            UNIQUE (dag_run_id, task_id, map_index, {key})){opts}""",
    """CREATE INDEX idx_task_state_store_dag_id_run_id_task_id_map_index
        ON task_state_store (dag_id, run_id, task_id, map_index)""",
    "CREATE INDEX idx_task_state_store_expires_at ON task_state_store (expires_at)",
    """CREATE TABLE asset_state_store (
        asset_id INTEGER NOT NULL,
        {key} VARCHAR(250) NOT NULL,
        {value} TEXT NOT NULL,
        updated_at {ts} NOT NULL DEFAULT {now},
        CONSTRAINT asset_state_store_pkey PRIMARY KEY (asset_id, {key}),
        CONSTRAINT asset_state_store_asset_id_fkey FOREIGN KEY (asset_id)
            REFERENCES asset (id) ON DELETE CASCADE){opts}""",
)

_DIALECT_WORDS = {
    "postgresql": {
        "ts": "TIMESTAMP WITH TIME ZONE", "now": "CURRENT_TIMESTAMP", "serial": "SERIAL NOT NULL",
        "json": "JSON", "uuid": "UUID", "name": "VARCHAR(1500)", "group": '"group"',
        "key": "key", "value": "value", "opts": "",
    },
    "mysql": {
        "ts": "TIMESTAMP(6)", "now": "CURRENT_TIMESTAMP(6)",
        "serial": "INTEGER NOT NULL AUTO_INCREMENT", "json": "JSON", "uuid": "CHAR(36)",
        # Airflow keeps asset name/uri latin1 on MySQL so (name, uri) fits one index.
        "name": "VARCHAR(1500) CHARACTER SET latin1 COLLATE latin1_general_cs",
        "group": "`group`", "key": "`key`", "value": "`value`",
        "opts": " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    },
}


def _family(bind: Engine | Connection) -> str:
    name = bind.dialect.name
    if name in ("mysql", "mariadb"):
        return "mysql"
    if name == "postgresql":
        return "postgresql"
    raise ValueError(f"the simulated Airflow database supports PostgreSQL and MySQL, not {name}")


def airflow_ddl(dialect: str) -> list[str]:
    """The CREATE statements for *dialect* (``postgresql``, ``mysql`` or ``mariadb``)."""
    words = _DIALECT_WORDS["mysql" if dialect in ("mysql", "mariadb") else dialect]
    return [stmt.format(**words) for stmt in _DDL]


def create_airflow_schema(engine: Engine) -> None:
    """Create the simulated Airflow 3.3 schema in the (empty) database of *engine*."""
    family = _family(engine)
    with engine.begin() as conn:
        if family == "mysql":
            # Airflow requires it on MySQL; without it TIMESTAMP columns get implicit defaults.
            conn.exec_driver_sql("SET SESSION explicit_defaults_for_timestamp = 1")
        for stmt in airflow_ddl(family):
            conn.exec_driver_sql(stmt)
        conn.execute(text("INSERT INTO alembic_version (version_num) VALUES (:v)"),
                     {"v": ALEMBIC_REVISION})


@contextmanager
def airflow_database(dialect: str) -> Iterator[str]:
    """A fresh database (``postgresql`` or ``mariadb``) holding the Airflow schema; its URL."""
    fresh = fresh_postgres_database if dialect == "postgresql" else fresh_mariadb_database
    with fresh() as url:
        engine = make_engine(url)
        try:
            create_airflow_schema(engine)
        finally:
            engine.dispose()
        yield url


# --- test data with Airflow's columns -----------------------------------------------------------


def add_dag_run(engine: Engine, dag_id: str, run_id: str, *, state: str = "running") -> int:
    """Insert a dag (if new) and a dag run the way Airflow fills them; returns dag_run.id."""
    with engine.begin() as conn:
        known = conn.execute(text("SELECT 1 FROM dag WHERE dag_id = :d"), {"d": dag_id}).first()
        if known is None:
            conn.execute(text("INSERT INTO dag (dag_id, is_paused, fileloc, bundle_name) "
                              "VALUES (:d, FALSE, :f, 'dags-folder')"),
                         {"d": dag_id, "f": f"/dags/{dag_id}.py"})
        now = _now_sql(conn)  # a constant per dialect; the values are bound
        conn.execute(text(
            "INSERT INTO dag_run (dag_id, run_id, state, run_type, triggered_by, run_after, "  # noqa: S608
            f"queued_at, conf) VALUES (:d, :r, :s, 'manual', 'rest_api', {now}, {now}, :conf)"
        ), {"d": dag_id, "r": run_id, "s": state, "conf": '{"k": 1}'})
        return int(conn.execute(text("SELECT id FROM dag_run WHERE dag_id = :d AND run_id = :r"),
                                {"d": dag_id, "r": run_id}).scalar_one())


def add_task_instance(engine: Engine, dag_id: str, run_id: str, task_id: str,
                      map_index: int = -1) -> None:
    import uuid

    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO task_instance (id, task_id, dag_id, run_id, map_index, state, "
            "try_number) VALUES (:id, :t, :d, :r, :m, 'success', 1)"
        ), {"id": str(uuid.uuid4()), "t": task_id, "d": dag_id, "r": run_id, "m": map_index})


def add_asset(engine: Engine, name: str, uri: str, *, active: bool = True) -> int:
    """Insert an asset with Airflow's extra columns (and its asset_active row); returns its id."""
    with engine.begin() as conn:
        group = "`group`" if _family(conn) == "mysql" else '"group"'
        conn.execute(text(f"INSERT INTO asset (name, uri, {group}, extra) "  # noqa: S608
                          "VALUES (:n, :u, 'asset', :x)"),
                     {"n": name, "u": uri, "x": '{"owner": "tests"}'})
        asset_id = int(conn.execute(text("SELECT id FROM asset WHERE name = :n AND uri = :u"),
                                    {"n": name, "u": uri}).scalar_one())
    if active:
        set_asset_active(engine, name, uri, True)
    return asset_id


def set_asset_active(engine: Engine, name: str, uri: str, active: bool) -> None:
    """Activate or deactivate an asset as Airflow's scheduler does: by its asset_active row."""
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM asset_active WHERE name = :n AND uri = :u"),
                     {"n": name, "u": uri})
        if active:
            conn.execute(text("INSERT INTO asset_active (name, uri) VALUES (:n, :u)"),
                         {"n": name, "u": uri})


def _now_sql(conn: Connection) -> str:
    return "UTC_TIMESTAMP(6)" if _family(conn) == "mysql" else "now()"


# --- proving the schema unchanged ---------------------------------------------------------------


def schema_fingerprint(engine: Engine) -> str:
    """A text that changes whenever the schema does: the server's own dump of every table
    (pg_dump --schema-only, or SHOW CREATE TABLE) followed by SQLAlchemy's inspector view."""
    return server_schema_dump(engine) + "\n" + inspector_view(engine)


def server_schema_dump(engine: Engine) -> str:
    """The server's own description of the schema; data (rows, counters) left out."""
    if _family(engine) == "postgresql":
        return _pg_dump_schema(engine)
    return _mysql_show_create(engine)


def inspector_view(engine: Engine) -> str:
    insp = inspect(engine)
    lines: list[str] = []
    for table in sorted(insp.get_table_names()):
        lines.append(f"table {table}")
        for col in insp.get_columns(table):
            lines.append(f"  column {col['name']} {col['type']!r} nullable={col['nullable']} "
                         f"default={col.get('default')!r}")
        lines.append(f"  pk {insp.get_pk_constraint(table)!r}")
        for key in ("foreign_keys", "indexes", "unique_constraints"):
            items: list[dict[str, Any]] = getattr(insp, f"get_{key}")(table)
            for item in sorted(items, key=lambda i: str(i.get("name"))):
                lines.append(f"  {key} {sorted(item.items())!r}")
    return "\n".join(lines)


def _pg_dump_schema(engine: Engine) -> str:
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise RuntimeError("pg_dump is not installed; it is needed to compare schemas")
    url = make_url(engine.url.render_as_string(hide_password=False)).set(
        drivername="postgresql")
    out = subprocess.run(
        [pg_dump, "--schema-only", "--no-owner", "--no-privileges",
         "-d", url.render_as_string(hide_password=False)],
        check=True, capture_output=True, text=True, timeout=60,
    )
    # \restrict / \unrestrict carry a random key per dump (pg_dump 15.14+); not schema.
    return "\n".join(line for line in out.stdout.splitlines()
                     if not line.startswith(("\\restrict", "\\unrestrict")))


def _mysql_show_create(engine: Engine) -> str:
    with engine.connect() as conn:
        tables = sorted(r[0] for r in conn.exec_driver_sql("SHOW TABLES"))
        dumps = [str(conn.exec_driver_sql(f"SHOW CREATE TABLE `{t}`").one()[1]) for t in tables]
    # The AUTO_INCREMENT counter is data (it moves with every insert), not schema.
    return "\n".join(re.sub(r" AUTO_INCREMENT=\d+", "", d) for d in dumps)
