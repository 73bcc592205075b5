"""Rows in a real Airflow schema (tests/airflow_schemas), as Airflow fills them: every required
column a test does not care about gets a value Airflow would accept, read from the live table,
so the same helper works on 3.3 and 3.4, PostgreSQL and MySQL/MariaDB.

``seed_airflow`` puts workers.seed's task and asset state into such a database (its dag runs and
assets made here, since Airflow's tables need more than the seed's columns), so
``expected_survivors`` and ``expected_live_asset_state`` hold for it as for a seeded one.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    BINARY,
    JSON,
    VARBINARY,
    Boolean,
    Connection,
    DateTime,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    func,
    insert,
    select,
    text,
)

from workers.schema import Tables
from workers.seed import (
    _SETVAL,
    DAGS,
    ROWS_PER_RUN,
    SeedCounts,
    SeedSpec,
    _task_row,
    kind_of,
)


def _filler(column: Any, now: dt.datetime | None = None) -> Any:
    """A value Airflow would accept for a required column this test does not care about;
    timestamps the server's now(), or *now* (many rows in one statement need a value)."""
    kind = column.type
    if isinstance(kind, Boolean):
        return False
    if isinstance(kind, (Integer, Float)):
        return 0
    if isinstance(kind, DateTime):
        return func.now() if now is None else now
    if isinstance(kind, JSON):
        return {}
    if column.name == "extra":  # JSON kept as checked text on MySQL
        return "{}"
    if isinstance(kind, Uuid):
        return uuid.uuid4()
    if isinstance(kind, (LargeBinary, BINARY, VARBINARY)):  # a UUID's bytes on MySQL: 3.4's
        return b"\0" * 16                                # region_id, the legacy region
    if isinstance(kind, (String, Text)):
        if column.primary_key:  # task_instance.id on MySQL: a UUID kept as text
            return str(uuid.uuid4())
        return "manual" if column.name.endswith("type") else "x"
    return "x"


def _filled(table: Table, values: dict[str, Any], now: dt.datetime | None = None
            ) -> dict[str, Any]:
    row = dict(values)
    for c in table.columns:
        if c.name in row or c.nullable or c.server_default is not None:
            continue
        if c.primary_key and isinstance(c.type, Integer):
            continue  # autoincrement
        row[c.name] = _filler(c, now)
    return row


def insert_row(conn: Connection, table_name: str, **values: Any) -> Any:
    """Insert into Airflow's table *table_name*, filling every required column not given;
    returns the primary key."""
    table = Table(table_name, MetaData(), autoload_with=conn)
    return conn.execute(table.insert().values(**_filled(table, values))).inserted_primary_key[0]


def dag_run(engine: Engine, dag_id: str, run_id: str, state: str = "running") -> int:
    """A dag run as the scheduler makes one (dag_run references no dag row); its id."""
    with engine.begin() as conn:
        return int(insert_row(conn, "dag_run", dag_id=dag_id, run_id=run_id, state=state))


def task_instance(engine: Engine, dag_id: str, run_id: str, task_id: str) -> None:
    with engine.begin() as conn:
        insert_row(conn, "task_instance", dag_id=dag_id, run_id=run_id, task_id=task_id,
                   state="success", try_number=1)


def asset(engine: Engine, name: str, uri: str, *, active: bool = True) -> int:
    """An asset (with its asset_active row if *active*); its id."""
    with engine.begin() as conn:
        asset_id = int(insert_row(conn, "asset", name=name, uri=uri, group="asset"))
    if active:
        set_asset_active(engine, name, uri, True)
    return asset_id


def set_asset_active(engine: Engine, name: str, uri: str, active: bool) -> None:
    """Activate or deactivate an asset as Airflow's scheduler does: by its asset_active row."""
    with engine.begin() as conn:
        table = Table("asset_active", MetaData(), autoload_with=conn)
        conn.execute(table.delete().where(table.c.name == name, table.c.uri == uri))
        if active:
            conn.execute(table.insert().values(name=name, uri=uri))


def seed_airflow(engine: Engine, tables: Tables, spec: SeedSpec, now: dt.datetime,
                 state: str = "success") -> SeedCounts:
    """workers.seed's rows in a fresh Airflow database: its dag runs (in *state*: finished by
    default, so protection keeps nothing) and assets made with Airflow's required columns, ids
    1, 2, … as the seed numbers them, then the same task and asset state."""
    runs = -(-spec.rows // ROWS_PER_RUN)
    with engine.begin() as conn:
        dr = Table("dag_run", MetaData(), autoload_with=conn)
        conn.execute(insert(dr), [_filled(dr, {"dag_id": f"dag_{r % DAGS}", "run_id": f"run_{r}",
                                               "state": state}, now) for r in range(runs)])
        ids = dict(conn.execute(select(dr.c.run_id, dr.c.id)).all())
        a = Table("asset", MetaData(), autoload_with=conn)
        conn.execute(insert(a), [_filled(a, {"name": f"asset_{k}", "uri": f"s3://bucket/asset_{k}",
                                             "group": "asset"}, now)
                                    for k in range(spec.assets)])
        asset_ids = list(conn.execute(select(a.c.id).order_by(a.c.id)).scalars())
    # The seed's expectations number dag runs and assets from 1; a fresh database does too.
    assert [ids[f"run_{r}"] for r in range(runs)] == list(range(1, runs + 1)), ids
    assert asset_ids == list(range(1, spec.assets + 1)), asset_ids
    task_rows = [{**_task_row(i, spec, now), **tables.scope_columns(-1, None)}
                 for i in range(spec.rows)]
    with engine.begin() as conn:
        for start in range(0, len(task_rows), 5000):
            conn.execute(insert(tables.task_state), task_rows[start:start + 5000])
        active = [{"name": f"asset_{k}", "uri": f"s3://bucket/asset_{k}"}
                  for k in range(spec.assets) if k % spec.inactive_every != 0]
        if active:
            conn.execute(insert(tables.asset_active), active)
        state_rows = [{"asset_id": k + 1, "key": f"k{j}", "value": f"v{j}", "updated_at": now}
                      for k in range(spec.assets) for j in range(spec.keys_per_asset)]
        if state_rows:
            conn.execute(insert(tables.asset_state), state_rows)
        if engine.dialect.name == "postgresql":  # the ids above were explicit
            conn.execute(text(_SETVAL.format(table=tables.task_state.name)))
    kinds = [kind_of(i, spec) for i in range(spec.rows)]
    orphaned = len(range(0, spec.assets, spec.inactive_every)) * spec.keys_per_asset
    return SeedCounts(kinds.count("expired"), kinds.count("never"), kinds.count("future"),
                      len(state_rows) - orphaned, orphaned)
