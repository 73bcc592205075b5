"""The tables statesweep reads and writes, in SQLAlchemy 2 Core, in both namings and layouts.

Naming (which tables):
``seed``    task_state / asset_state, as in the AIP-103 commit.
``airflow`` task_state_store / asset_state_store, as released in Airflow 3.3, with Airflow's
            naming convention for indexes and constraints.

Layout (which columns of task state; read from the live table, never guessed):
``3.3``     ``map_index`` in the unique key (dag_run_id, task_id, map_index, key).
``3.4``     ``map_index`` renamed ``region_index``, and ``region_id`` (a UUID; all zeros is the
            legacy namespace) added to the unique key (dag_run_id, task_id, region_id,
            region_index, key).

statesweep only ever creates these tables on a database it owns (``statesweep db upgrade`` on an
empty database). On an Airflow database it reads the live schema's names and never alters it.
"""

from __future__ import annotations

import datetime as dt
import uuid
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
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    inspect,
)
from sqlalchemy.dialects import mysql, postgresql

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

#: The task-state columns that tell the layouts apart, and the Airflow release of each.
LAYOUT_COLUMNS = {"3.3": ("map_index",), "3.4": ("region_index", "region_id")}
LAYOUTS = tuple(LAYOUT_COLUMNS)
#: region_id of state written outside any region (every row Airflow 3.3 wrote, migrated).
LEGACY_REGION = uuid.UUID(int=0)

#: Columns statesweep relies on, per logical table; checked on every database it opens (the
#: task_state columns of the layout come on top, from LAYOUT_COLUMNS).
REQUIRED_COLUMNS = {
    "task_state": ("id", "dag_run_id", "task_id", "key", "value", "expires_at"),
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


class RegionId(TypeDecorator[uuid.UUID]):
    """Airflow 3.4's region_id: ``uuid`` on PostgreSQL, 16 raw bytes (BINARY(16)) elsewhere,
    as Airflow stores it. Values are :class:`uuid.UUID` on every dialect."""

    impl = LargeBinary(16)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.UUID(as_uuid=True))
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.BINARY(16))
        return dialect.type_descriptor(LargeBinary(16))

    def process_bind_param(self, value: uuid.UUID | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, uuid.UUID):
            raise ValueError(f"region_id must be a uuid.UUID, got {value!r}")
        return value if dialect.name == "postgresql" else value.bytes

    def process_result_value(self, value: Any, dialect: Dialect) -> uuid.UUID | None:
        if value is None or isinstance(value, uuid.UUID):
            return value
        if isinstance(value, str):
            return uuid.UUID(value)
        return uuid.UUID(bytes=bytes(value))


@dataclass(frozen=True)
class Tables:
    """The five tables of one naming and layout, bound to one MetaData."""

    naming: str
    metadata: MetaData
    dag_run: Table
    task_state: Table
    asset: Table
    asset_active: Table
    asset_state: Table
    layout: str = "3.3"

    @property
    def has_run_state(self) -> bool:
        """Whether dag_run has Airflow's ``state`` (which protects state of unfinished runs)."""
        return "state" in self.dag_run.c

    @property
    def index_column(self) -> Column[int]:
        """The task's map index: ``map_index`` (3.3), ``region_index`` (3.4)."""
        c = self.task_state.c
        return c.region_index if self.layout == "3.4" else c.map_index  # type: ignore[no-any-return]

    @property
    def task_key(self) -> tuple[str, ...]:
        """The unique key of one task-state row, by column name."""
        if self.layout == "3.4":
            return ("dag_run_id", "task_id", "region_id", "region_index", "key")
        return ("dag_run_id", "task_id", "map_index", "key")

    def scope_columns(self, map_index: int, region_id: uuid.UUID | None) -> dict[str, Any]:
        """The layout's columns for a task's map index (and 3.4's region): what a writer puts
        in a row beside dag_run_id, task_id and key. A region on 3.3 is an error: 3.3 has no
        place for it, and dropping it would merge two regions' state into one row."""
        if self.layout == "3.4":
            return {"region_index": map_index, "region_id": region_id or LEGACY_REGION}
        if region_id is not None and region_id != LEGACY_REGION:
            raise ValueError(f"region_id {region_id} needs Airflow 3.4's task state layout; "
                             f"{self.task_state.name} has Airflow 3.3's (map_index)")
        return {"map_index": map_index}


def build_tables(naming: str, layout: str = "3.3", *, run_state: bool = False) -> Tables:
    """Table objects for *naming* (``seed`` or ``airflow``) and *layout* (``3.3`` or ``3.4``),
    with Airflow's ``dag_run.state`` where *run_state*; pure, no database access."""
    if naming not in TABLE_NAMES:
        raise ValueError(f"naming must be 'seed' or 'airflow', not {naming!r}")
    if layout not in LAYOUT_COLUMNS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    task_name, asset_state_name = TABLE_NAMES[naming]
    md = MetaData(naming_convention=AIRFLOW_CONVENTION if naming == "airflow" else {})

    dag_run = Table(
        "dag_run", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("dag_id", _id_string(), nullable=False),
        Column("run_id", _id_string(), nullable=False),
        # Airflow's, read (never written) to protect state of unfinished dag runs.
        *([Column("state", String(50), nullable=True)] if run_state else []),
        UniqueConstraint("dag_id", "run_id", name="dag_run_dag_id_run_id_key"),
    )
    index_name = "region_index" if layout == "3.4" else "map_index"
    region = ([Column("region_id", RegionId, nullable=False,
                      default=LEGACY_REGION)] if layout == "3.4" else [])
    task_state = Table(
        task_name, md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("dag_run_id", Integer, nullable=False),
        Column("task_id", _id_string(), nullable=False),
        *region,
        Column(index_name, Integer, nullable=False, server_default="-1"),
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
            *(("dag_run_id", "task_id", "region_id", "region_index", "key") if layout == "3.4"
              else ("dag_run_id", "task_id", "map_index", "key")),
            name=f"{task_name}_dag_run_id_uq"),
        Index(f"idx_{task_name}_lookup", "dag_id", "run_id", "task_id", index_name),
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
    return Tables(naming, md, dag_run, task_state, asset, asset_active, asset_state, layout)


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


def detect_layout(bind: Engine | Connection, naming: str) -> str:
    """Which task-state layout the live table has (3.3 or 3.4), read from its columns; an
    unknown layout (a future Airflow) is a SchemaError naming what was found."""
    name = TABLE_NAMES[naming][0]
    insp = inspect(bind)
    if name not in set(insp.get_table_names()):
        return "3.3"  # verify_columns names the missing table
    have = {c["name"] for c in insp.get_columns(name)}
    for layout, columns in LAYOUT_COLUMNS.items():
        if have.issuperset(columns):
            return layout
    raise SchemaError(
        f"{name} has a layout statesweep does not know (columns: {', '.join(sorted(have))}); "
        "it knows Airflow 3.3's (map_index) and 3.4's (region_index, region_id): "
        "upgrade statesweep for this Airflow version")


def resolve_tables(bind: Engine | Connection, naming: str = "auto") -> Tables:
    """Tables for the configured naming (``auto`` inspects) and the live layout, after checking
    the live columns."""
    chosen = detect_naming(bind) if naming == "auto" else naming
    insp = inspect(bind)
    run_state = ("dag_run" in insp.get_table_names()
                 and "state" in {c["name"] for c in insp.get_columns("dag_run")})
    tables = build_tables(chosen, detect_layout(bind, chosen), run_state=run_state)
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
        extra = LAYOUT_COLUMNS[tables.layout] if key == "task_state" else ()
        for column in (*REQUIRED_COLUMNS[key], *extra):
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


def upgrade(engine: Engine, naming: str = "seed", layout: str = "3.3") -> list[str]:
    """Create the standalone schema on a database statesweep owns; returns the tables created.

    This is statesweep's documented equivalent of an Alembic migration: one versioned step,
    recorded in the ``statesweep_schema`` table, re-runnable (a second call creates nothing).
    It refuses to touch a database that holds an Airflow schema or tables it did not create.
    """
    tables = build_tables(naming, layout)
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
