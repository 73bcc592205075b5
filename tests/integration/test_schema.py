"""The standalone schema on each dialect and naming: keys, indexes and cascades as designed;
upgrade is re-runnable and refuses databases it does not own; naming detection and column
checks fail with a clear SchemaError."""

from __future__ import annotations

import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    inspect,
    select,
)

from tests.airflow_schemas.fingerprint import inspector_view
from tests.conftest import create_schema, database_now
from workers.db import make_engine
from workers.exceptions import RefusedError, SchemaError
from workers.schema import (
    OWN_MARKER,
    SCHEMA_VERSION,
    TABLE_NAMES,
    Tables,
    build_tables,
    detect_layout,
    detect_naming,
    resolve_tables,
    upgrade,
)

pytestmark = pytest.mark.integration

OTHER = {"seed": "airflow", "airflow": "seed"}


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def test_upgrade_creates_keys_indexes_and_foreign_keys(db_url: str, naming: str) -> None:
    engine, _ = create_schema(db_url, naming)
    task, asset_state = TABLE_NAMES[naming]
    insp = inspect(engine)
    assert table_names(engine) == {"dag_run", task, "asset", "asset_active", asset_state,
                                   OWN_MARKER}

    assert insp.get_pk_constraint(task)["constrained_columns"] == ["id"]
    assert insp.get_pk_constraint(asset_state)["constrained_columns"] == ["asset_id", "key"]
    uniques = {u["name"]: u["column_names"] for u in insp.get_unique_constraints(task)}
    assert uniques == {f"{task}_dag_run_id_uq": ["dag_run_id", "task_id", "map_index", "key"]}
    indexes = {i["name"]: i["column_names"] for i in insp.get_indexes(task) if not i["unique"]}
    assert indexes == {f"idx_{task}_lookup": ["dag_id", "run_id", "task_id", "map_index"],
                       f"idx_{task}_expires_at": ["expires_at"]}

    fks = {(fk["name"], fk["referred_table"], tuple(fk["constrained_columns"]),
            tuple(fk["referred_columns"]), fk["options"].get("ondelete"))
           for name in (task, asset_state) for fk in insp.get_foreign_keys(name)}
    assert fks == {
        (f"{task}_dag_run_id_fkey", "dag_run", ("dag_run_id",), ("id",), "CASCADE"),
        (f"{asset_state}_asset_id_fkey", "asset", ("asset_id",), ("id",), "CASCADE"),
    }
    nullable = {c["name"]: c["nullable"] for c in insp.get_columns(task)}
    assert nullable.pop("expires_at") is True
    assert not any(nullable.values()), nullable
    engine.dispose()


def test_cascade_deletes_state_of_a_deleted_dag_run_and_asset(db_url: str, naming: str) -> None:
    engine, t = create_schema(db_url, naming)
    now = database_now(engine)
    with engine.begin() as conn:
        conn.execute(insert(t.dag_run), [{"id": 1, "dag_id": "d", "run_id": "r1"},
                                         {"id": 2, "dag_id": "d", "run_id": "r2"}])
        # map_index left out: the server default (-1) fills it.
        conn.execute(insert(t.task_state), [
            {"dag_run_id": run, "task_id": "t", "key": f"k{i}", "dag_id": "d",
             "run_id": f"r{run}", "value": "v", "updated_at": now}
            for run in (1, 2) for i in range(3)])
        conn.execute(insert(t.asset), [{"id": 1, "name": "a1", "uri": "s3://a1"},
                                       {"id": 2, "name": "a2", "uri": "s3://a2"}])
        conn.execute(insert(t.asset_state), [
            {"asset_id": a, "key": f"k{i}", "value": "v", "updated_at": now}
            for a in (1, 2) for i in range(2)])
    with engine.begin() as conn:
        conn.execute(delete(t.dag_run).where(t.dag_run.c.id == 1))
        conn.execute(delete(t.asset).where(t.asset.c.id == 2))
    with engine.connect() as conn:
        task_rows = conn.execute(select(t.task_state.c.dag_run_id, t.task_state.c.map_index)).all()
        asset_rows = conn.execute(select(t.asset_state.c.asset_id)).scalars().all()
    assert sorted(task_rows) == [(2, -1)] * 3
    assert sorted(asset_rows) == [1, 1]
    engine.dispose()


def test_second_upgrade_changes_nothing(db_url: str, naming: str) -> None:
    engine = make_engine(db_url)
    created = upgrade(engine, naming)
    assert set(created) == {"dag_run", "asset", "asset_active", *TABLE_NAMES[naming],
                            OWN_MARKER}
    before = inspector_view(engine)
    assert upgrade(engine, naming) == []
    assert inspector_view(engine) == before
    marker = Table(OWN_MARKER, MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(select(marker))] == [(SCHEMA_VERSION, naming)]
    with pytest.raises(RefusedError, match=f"created with the '{naming}' naming"):
        upgrade(engine, OTHER[naming])
    assert inspector_view(engine) == before
    engine.dispose()


def test_detect_naming_and_resolve_tables(db_url: str, naming: str) -> None:
    engine, _ = create_schema(db_url, naming)
    assert detect_naming(engine) == naming
    tables = resolve_tables(engine, "auto")
    assert (tables.naming, tables.task_state.name) == (naming, TABLE_NAMES[naming][0])
    assert resolve_tables(engine, naming).naming == naming
    missing = TABLE_NAMES[OTHER[naming]][0]
    with pytest.raises(SchemaError, match=f"'{missing}' is missing"):
        resolve_tables(engine, OTHER[naming])
    engine.dispose()


def test_layout_is_read_from_the_live_columns(db_url: str, naming: str, layout: str) -> None:
    """3.3 (map_index) and 3.4 (region_index + region_id) are told apart by the columns the
    live table has; nothing in the configuration says which."""
    engine, _ = create_schema(db_url, naming, layout)
    assert detect_layout(engine, naming) == layout
    tables = resolve_tables(engine, "auto")
    assert tables.layout == layout
    assert tables.index_column.name == ("region_index" if layout == "3.4" else "map_index")
    assert ("region_id" in tables.task_state.c) == (layout == "3.4")
    engine.dispose()


def test_an_unknown_layout_is_one_clear_error(db_url: str) -> None:
    """A future Airflow whose task state has neither layout's columns: one SchemaError that
    names the table, what it has, and what statesweep knows, before anything runs."""
    engine, _ = create_schema(db_url, "airflow", "3.3")
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE task_state_store RENAME COLUMN map_index TO slot_index")
    with pytest.raises(SchemaError) as err:
        resolve_tables(engine, "auto")
    message = str(err.value)
    assert "task_state_store has a layout statesweep does not know" in message
    assert "slot_index" in message and "region_index, region_id" in message
    engine.dispose()


def test_empty_database_names_the_way_out(db_url: str) -> None:
    engine = make_engine(db_url)
    for call in (detect_naming, resolve_tables):
        with pytest.raises(SchemaError) as err:
            call(engine)
        assert "neither task_state nor task_state_store" in str(err.value)
        assert "statesweep db upgrade" in str(err.value)
    engine.dispose()


def test_both_namings_present_is_ambiguous(db_url: str) -> None:
    engine, _ = create_schema(db_url, "seed")
    build_tables("airflow").task_state.create(engine)
    with pytest.raises(SchemaError) as err:
        detect_naming(engine)
    assert "both task_state and task_state_store" in str(err.value)
    assert "STATESWEEP_TABLE_NAMING" in str(err.value)
    with pytest.raises(SchemaError, match="both"):
        resolve_tables(engine, "auto")
    # Naming one explicitly settles it.
    assert resolve_tables(engine, "seed").task_state.name == "task_state"
    engine.dispose()


def _create_without_expires_at(engine: Engine, tables: Tables) -> None:
    others = [tables.dag_run, tables.asset, tables.asset_active, tables.asset_state]
    tables.metadata.create_all(engine, tables=others)
    md = MetaData()
    Table(tables.task_state.name, md, Column("id", Integer, primary_key=True),
          Column("dag_run_id", Integer, nullable=False), Column("task_id", String(250)),
          Column("map_index", Integer), Column("key", String(250)), Column("value", Text))
    md.create_all(engine)


def test_missing_expires_at_is_named(db_url: str, naming: str) -> None:
    engine = make_engine(db_url)
    tables = build_tables(naming)
    _create_without_expires_at(engine, tables)
    for configured in ("auto", naming):
        with pytest.raises(SchemaError) as err:
            resolve_tables(engine, configured)
        assert f"column {tables.task_state.name}.expires_at is missing" in str(err.value)
    engine.dispose()


def test_missing_table_and_columns_are_all_listed(db_url: str) -> None:
    engine, t = create_schema(db_url, "seed")
    t.asset_active.drop(engine)
    with pytest.raises(SchemaError) as err:
        resolve_tables(engine, "seed")
    assert "table 'asset_active' is missing" in str(err.value)
    engine.dispose()


def _airflow_marker_tables(md: MetaData) -> None:
    Table("alembic_version", md, Column("version_num", String(32), primary_key=True))
    Table("dag", md, Column("dag_id", String(250), primary_key=True))
    Table("task_instance", md, Column("id", String(36), primary_key=True),
          Column("dag_id", String(250)), Column("run_id", String(250)))


def test_upgrade_refuses_a_database_holding_an_airflow_schema(db_url: str, naming: str) -> None:
    engine = make_engine(db_url)
    md = MetaData()
    _airflow_marker_tables(md)
    md.create_all(engine)
    before = inspector_view(engine)
    with pytest.raises(RefusedError) as err:
        upgrade(engine, naming)
    msg = str(err.value)
    assert "Airflow schema" in msg
    assert "alembic_version, dag, task_instance" in msg
    assert inspector_view(engine) == before
    engine.dispose()


@pytest.mark.parametrize("foreign", ["invoices", "task_state"])
def test_upgrade_refuses_a_database_with_foreign_tables(db_url: str, foreign: str) -> None:
    engine = make_engine(db_url)
    md = MetaData()
    Table(foreign, md, Column("id", Integer, primary_key=True), Column("note", Text))
    md.create_all(engine)
    before = inspector_view(engine)
    for naming in ("seed", "airflow"):
        with pytest.raises(RefusedError, match=f"did not create \\({foreign}\\)"):
            upgrade(engine, naming)
    assert inspector_view(engine) == before
    engine.dispose()
