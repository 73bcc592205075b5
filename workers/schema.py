"""The tables statesweep reads and writes, in SQLAlchemy 2 Core, in both namings.

``seed``    task_state / asset_state, as in the AIP-103 commit.
``airflow`` task_state_store / asset_state_store, as released in Airflow 3.3, with Airflow's
            naming convention for indexes and constraints.

statesweep only ever creates these tables on a database it owns (``statesweep db upgrade`` on an
empty database). On an Airflow database it reads the live schema's names and never alters it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    inspect,
)
from sqlalchemy.dialects import mysql

from workers.exceptions import RefusedError, SchemaError

# Airflow's metadata naming convention (airflow/models/base.py).
AIRFLOW_CONVENTION = {
    "ix": "idx_%(column_0_label)s",
    "uq": "%(table_name)s_%(column_0_name)s_uq",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
    "pk": "%(table_name)s_pkey",
}

TABLE_NAMES = {
    "seed": ("task_state", "asset_state"),
    "airflow": ("task_state_store", "asset_state_store"),
}

#: Columns statesweep relies on, per logical table; checked on every database it opens.
REQUIRED_COLUMNS = {
    "task_state": ("id", "dag_run_id", "task_id", "map_index", "key", "value", "expires_at"),
    "asset_state": ("asset_id", "key", "value"),
    "asset": ("id", "name", "uri"),
    "asset_active": ("name", "uri"),
    "dag_run": ("id", "dag_id", "run_id"),
}

ID_LEN = 250


class UtcDateTime(TypeDecorator[dt.datetime]):
    """Timestamps are UTC. PostgreSQL keeps timestamptz; MySQL and SQLite keep naive UTC.

    Values come back timezone-aware (UTC) on every dialect, as Airflow's UtcDateTime does, so
    comparisons never mix naive and aware datetimes.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given; statesweep stores UTC only")
        value = value.astimezone(dt.UTC)
        if dialect.name != "postgresql":
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def _id_string(length: int = ID_LEN) -> String:
    # MySQL's default collations (utf8mb4_general_ci, utf8mb4_0900_ai_ci) fold case and accents,
    # so a unique key there would treat "offset"/"Offset" or "café"/"cafe" as one row and the
    # upsert would overwrite one with the other. Airflow makes its id columns binary on MySQL
    # ([database] sql_engine_collation_for_ids); so do we, matching PostgreSQL and SQLite.
    return String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )


def _name_string(length: int = 1500) -> String:
    # MySQL indexes are limited to 3072 bytes; Airflow keeps asset name/uri latin1 there.
    return String(length).with_variant(
        mysql.VARCHAR(length, charset="latin1", collation="latin1_general_cs"), "mysql", "mariadb"
    )


@dataclass(frozen=True)
class Tables:
    """The five tables of one naming, bound to one MetaData."""

    naming: str
    metadata: MetaData
    dag_run: Table
    task_state: Table
    asset: Table
    asset_active: Table
    asset_state: Table


def build_tables(naming: str) -> Tables:
    """Table objects for *naming* (``seed`` or ``airflow``); pure, no database access."""
    if naming not in TABLE_NAMES:
        raise ValueError(f"naming must be 'seed' or 'airflow', not {naming!r}")
    task_name, asset_state_name = TABLE_NAMES[naming]
    md = MetaData(naming_convention=AIRFLOW_CONVENTION if naming == "airflow" else {})

    dag_run = Table(
        "dag_run", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("dag_id", _id_string(), nullable=False),
        Column("run_id", _id_string(), nullable=False),
        UniqueConstraint("dag_id", "run_id", name="dag_run_dag_id_run_id_key"),
    )
    task_state = Table(
        task_name, md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("dag_run_id", Integer, nullable=False),
        Column("task_id", _id_string(), nullable=False),
        Column("map_index", Integer, nullable=False, server_default="-1"),
        Column("key", _id_string(), nullable=False),
        # Denormalised from dag_run so lookups by (dag_id, run_id) need no join.
        Column("dag_id", _id_string(), nullable=False),
        Column("run_id", _id_string(), nullable=False),
        Column("value", Text, nullable=False),
        Column("updated_at", UtcDateTime, nullable=False),
        # NULL means "never expires"; retention cleanup never deletes those rows.
        Column("expires_at", UtcDateTime, nullable=True),
        ForeignKeyConstraint(
            ["dag_run_id"], ["dag_run.id"], ondelete="CASCADE",
            name=f"{task_name}_dag_run_id_fkey",
        ),
        UniqueConstraint(
            "dag_run_id", "task_id", "map_index", "key", name=f"{task_name}_dag_run_id_uq"
        ),
        Index(f"idx_{task_name}_lookup", "dag_id", "run_id", "task_id", "map_index"),
        Index(f"idx_{task_name}_expires_at", "expires_at"),
    )
    asset = Table(
        "asset", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("name", _name_string(), nullable=False),
        Column("uri", _name_string(), nullable=False),
        Index("idx_asset_name_uri_unique", "name", "uri", unique=True),
    )
    asset_active = Table(
        "asset_active", md,
        Column("name", _name_string(), nullable=False),
        Column("uri", _name_string(), nullable=False),
        PrimaryKeyConstraint("name", "uri", name="asset_active_pkey"),
    )
    asset_state = Table(
        asset_state_name, md,
        Column("asset_id", Integer,
               ForeignKey("asset.id", ondelete="CASCADE",
                          name=f"{asset_state_name}_asset_id_fkey"),
               nullable=False),
        Column("key", _id_string(), nullable=False),
        Column("value", Text, nullable=False),
        Column("updated_at", UtcDateTime, nullable=False),
        PrimaryKeyConstraint("asset_id", "key", name=f"{asset_state_name}_pkey"),
    )
    return Tables(naming, md, dag_run, task_state, asset, asset_active, asset_state)


def detect_naming(bind: Engine | Connection) -> str:
    """Which naming the live database uses; a clear SchemaError when it holds neither."""
    names = set(inspect(bind).get_table_names())
    has_seed = TABLE_NAMES["seed"][0] in names
    has_airflow = TABLE_NAMES["airflow"][0] in names
    if has_seed and has_airflow:
        raise SchemaError(
            "the database holds both task_state and task_state_store; "
            "set STATESWEEP_TABLE_NAMING to 'seed' or 'airflow' to say which one to clean"
        )
    if has_airflow:
        return "airflow"
    if has_seed:
        return "seed"
    raise SchemaError(
        "the database holds neither task_state nor task_state_store: point "
        "STATESWEEP_DATABASE_URL at an Airflow 3.3 metadata database, or run "
        "'statesweep db upgrade' to create the standalone schema"
    )


def resolve_tables(bind: Engine | Connection, naming: str = "auto") -> Tables:
    """Tables for the configured naming (``auto`` inspects), after checking the live columns."""
    chosen = detect_naming(bind) if naming == "auto" else naming
    tables = build_tables(chosen)
    verify_columns(bind, tables)
    return tables


def verify_columns(bind: Engine | Connection, tables: Tables) -> None:
    """Fail with the table and column named when the live schema lacks what statesweep needs."""
    insp = inspect(bind)
    live = set(insp.get_table_names())
    logical = {
        "dag_run": tables.dag_run, "task_state": tables.task_state, "asset": tables.asset,
        "asset_active": tables.asset_active, "asset_state": tables.asset_state,
    }
    problems: list[str] = []
    for key, table in logical.items():
        if table.name not in live:
            problems.append(f"table {table.name!r} is missing")
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for column in REQUIRED_COLUMNS[key]:
            if column not in have:
                problems.append(f"column {table.name}.{column} is missing")
    if problems:
        raise SchemaError(
            f"the database does not have the {tables.naming!r} state-store schema: "
            + "; ".join(problems)
        )


# Tables only an Airflow metadata database has; their presence means "not ours to alter".
AIRFLOW_MARKERS = ("alembic_version", "task_instance", "dag", "serialized_dag", "log")
OWN_MARKER = "statesweep_schema"
SCHEMA_VERSION = 1


def upgrade(engine: Engine, naming: str = "seed") -> list[str]:
    """Create the standalone schema on a database statesweep owns; returns the tables created.

    This is statesweep's documented equivalent of an Alembic migration: one versioned step,
    recorded in the ``statesweep_schema`` table, re-runnable (a second call creates nothing).
    It refuses to touch a database that holds an Airflow schema or tables it did not create.
    """
    tables = build_tables(naming)
    existing = set(inspect(engine).get_table_names())
    airflow_tables = sorted(existing & set(AIRFLOW_MARKERS))
    if airflow_tables:
        raise RefusedError(
            "refusing to alter this database: it holds an Airflow schema "
            f"(found {', '.join(airflow_tables)}). statesweep works on it as it is; "
            "no upgrade is needed or allowed"
        )
    ours = set(tables.metadata.tables)
    if existing and OWN_MARKER not in existing:
        foreign = sorted(existing & ours) or sorted(existing)
        raise RefusedError(
            "refusing to alter this database: it already holds tables statesweep did not "
            f"create ({', '.join(foreign[:5])})"
        )
    marker = Table(
        OWN_MARKER, tables.metadata,
        Column("version", Integer, primary_key=True),
        Column("naming", String(16), nullable=False),
    )
    with engine.begin() as conn:
        if OWN_MARKER in existing:
            row = conn.execute(marker.select()).first()
            if row is not None and row.naming != naming:
                raise RefusedError(
                    f"this database was created with the {row.naming!r} naming, not {naming!r}"
                )
        created = [t.name for t in tables.metadata.sorted_tables if t.name not in existing]
        tables.metadata.create_all(conn, checkfirst=True)
        if OWN_MARKER not in existing:
            conn.execute(marker.insert().values(version=SCHEMA_VERSION, naming=naming))
    tables.metadata.remove(marker)
    return created
