"""statesweep on real Airflow metadata databases (tests/airflow_schemas: made by `airflow db
migrate` of Airflow 3.3.2 and 3.4.0b2, on PostgreSQL and MariaDB): it finds the airflow naming,
writes and reads state, runs a cleanup and the orphan sweep, keeps the state of unfinished dag
runs, refuses to upgrade, and leaves the schema byte-for-byte as it found it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, func, literal_column, select, text

from tests.airflow_schemas import VERSIONS, airflow_schema_database
from tests.airflow_schemas.fingerprint import (
    inspector_view,
    schema_fingerprint,
    server_schema_dump,
)
from tests.airflow_schemas.rows import (
    asset,
    dag_run,
    seed_airflow,
    set_asset_active,
    task_instance,
)
from tests.cleanup_runs import memory_store
from tests.conftest import database_now
from workers.chunk import run_local
from workers.cleanup import count_protected, delete_range, sweep_orphaned_asset_state
from workers.db import make_engine
from workers.exceptions import NotFound, RefusedError, SchemaError
from workers.exporter import read_backlog
from workers.planners import ChunkRange
from workers.schema import detect_naming, resolve_tables, upgrade
from workers.seed import (
    SeedSpec,
    asset_state_rows,
    expected_live_asset_state,
    expected_survivors,
    task_state_rows,
)
from workers.settings import Settings
from workers.store import NEVER, AssetScope, MetastoreStateBackend, TaskScope

pytestmark = pytest.mark.integration

AIRFLOW_DIALECTS = ["postgresql", "mariadb"]
#: Every Airflow database these tests use: each version on each dialect.
AIRFLOWS = [(d, v) for v, _ in VERSIONS for d in AIRFLOW_DIALECTS]
AIRFLOW_IDS = [f"{d}-airflow-{v}" for d, v in AIRFLOWS]
# Rows of Airflow's own tables; statesweep must never change them.
AIRFLOW_OWN = ("dag", "dag_run", "task_instance", "asset", "asset_active", "alembic_version")


@pytest.fixture(params=AIRFLOWS, ids=AIRFLOW_IDS)
def airflow_url(request: pytest.FixtureRequest) -> Iterator[str]:
    with airflow_schema_database(*request.param) as url:
        yield url


@pytest.fixture
def engine(airflow_url: str) -> Iterator[Engine]:
    engine = make_engine(airflow_url)
    yield engine
    engine.dispose()


def own_rows(engine: Engine) -> dict[str, list[tuple[object, ...]]]:
    """Every row of Airflow's own tables, in a stable order."""
    with engine.connect() as conn:
        return {t: sorted(tuple(map(str, r)) for r in conn.execute(text(f"SELECT * FROM {t}")))  # noqa: S608
                for t in AIRFLOW_OWN}


def test_fingerprint_is_stable_and_sees_a_schema_change(engine: Engine) -> None:
    dump, view = server_schema_dump(engine), inspector_view(engine)
    assert "task_state_store_dag_run_fkey" in dump
    assert "idx_task_state_store_expires_at" in view
    dag_run(engine, "etl", "run")  # data, not schema
    assert (server_schema_dump(engine), inspector_view(engine)) == (dump, view)
    with engine.begin() as conn:
        conn.execute(text("CREATE INDEX idx_probe ON dag_run (clear_number)"))
    assert server_schema_dump(engine) != dump
    assert inspector_view(engine) != view


def test_resolves_airflow_naming_and_refuses_to_upgrade(engine: Engine) -> None:
    before = schema_fingerprint(engine)
    assert detect_naming(engine) == "airflow"
    tables = resolve_tables(engine, "auto")
    assert (tables.task_state.name, tables.asset_state.name) == (
        "task_state_store", "asset_state_store")
    assert resolve_tables(engine, "airflow").naming == "airflow"
    with pytest.raises(SchemaError, match="'task_state' is missing"):
        resolve_tables(engine, "seed")
    for naming in ("seed", "airflow"):
        with pytest.raises(RefusedError, match="Airflow schema.*alembic_version"):
            upgrade(engine, naming)
    assert schema_fingerprint(engine) == before


def test_store_writes_and_reads_on_airflow_database(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    run_pk = dag_run(engine, "etl", "manual__1")
    task_instance(engine, "etl", "manual__1", "extract")
    asset(engine, "orders", "s3://lake/orders")
    before, rows_before = schema_fingerprint(engine), own_rows(engine)

    backend = MetastoreStateBackend(make_settings(default_retention_days=7), engine,
                                    resolve_tables(engine))
    scope = TaskScope("etl", "manual__1", "extract")
    t0 = database_now(engine)
    backend.set(scope, "cursor", "41")
    backend.set(scope, "cursor", "42")
    backend.set(scope, "forever", "x", retention=NEVER)
    backend.set(TaskScope("etl", "manual__1", "extract", map_index=3), "cursor", "m3")
    t1 = database_now(engine)
    assert backend.get(scope, "cursor") == "42"
    tables = resolve_tables(engine)
    t, index = tables.task_state, tables.index_column  # map_index, or 3.4's region_index
    with engine.connect() as conn:
        rows = conn.execute(select(t.c.dag_run_id, index.label("index"), t.c.key, t.c.expires_at)
                            .order_by(index, t.c.key)).all()
    assert [(r.dag_run_id, r.index, r.key) for r in rows] == [
        (run_pk, -1, "cursor"), (run_pk, -1, "forever"), (run_pk, 3, "cursor")]
    assert t0 + dt.timedelta(days=7) <= rows[0].expires_at <= t1 + dt.timedelta(days=7)
    assert rows[1].expires_at is None

    backend.clear(scope, all_map_indices=True)
    assert backend.get(scope, "forever") is None
    assert backend.get(TaskScope("etl", "manual__1", "extract", map_index=3), "cursor") is None
    with pytest.raises(NotFound, match="'etl'/'missing'"):
        backend.set(TaskScope("etl", "missing", "extract"), "k", "v")

    by_name = AssetScope(name="orders", uri="s3://lake/orders")
    backend.set(by_name, "watermark", "2026-01-01")
    with engine.connect() as conn:
        aid = conn.execute(text("SELECT id FROM asset WHERE name = 'orders'")).scalar_one()
    assert backend.get(AssetScope(asset_id=aid), "watermark") == "2026-01-01"
    backend.delete(AssetScope(asset_id=aid), "watermark")
    assert backend.get(by_name, "watermark") is None

    assert own_rows(engine) == rows_before
    assert schema_fingerprint(engine) == before


def test_local_cleanup_and_orphan_sweep_on_airflow_database(
    engine: Engine, airflow_url: str, make_settings: Callable[..., Settings]
) -> None:
    before = schema_fingerprint(engine)
    tables = resolve_tables(engine)
    spec = SeedSpec(rows=3000, assets=30, keys_per_asset=4)
    counts = seed_airflow(engine, tables, spec, database_now(engine))
    task_instance(engine, "dag_0", "run_0", "task_0")
    rows_before = own_rows(engine)
    assets_before = asset_state_rows(engine, tables)

    settings = make_settings(database_url=airflow_url, run_store_url="memory://")
    registry = memory_store()
    summary = run_local(settings, engine, tables, registry, batch_size=500)
    record = registry.get(summary.run_id)
    assert record is not None and (record.state, record.rows_deleted) == (
        "finished", counts.expired)
    assert record.chunks_done == record.chunks_planned > 1
    assert task_state_rows(engine, tables) == expected_survivors(spec)
    assert asset_state_rows(engine, tables) == assets_before  # retention never touches assets

    swept = sweep_orphaned_asset_state(engine, tables, 7)
    assert swept.rows == counts.asset_rows_orphaned
    assert asset_state_rows(engine, tables) == expected_live_asset_state(spec)
    assert task_state_rows(engine, tables) == expected_survivors(spec)

    # An asset deactivated by Airflow's scheduler loses its state on the next sweep; the
    # others keep theirs.
    set_asset_active(engine, "asset_1", "s3://bucket/asset_1", False)
    assert sweep_orphaned_asset_state(engine, tables, 3).rows == spec.keys_per_asset
    assert asset_state_rows(engine, tables) == {
        r for r in expected_live_asset_state(spec) if r[0] != 2}
    set_asset_active(engine, "asset_1", "s3://bucket/asset_1", True)

    assert own_rows(engine) == rows_before
    assert schema_fingerprint(engine) == before


# Each session starts in a time zone far from UTC, as on a server whose default zone is not
# UTC. Airflow keeps MySQL timestamps as TIMESTAMP, which MySQL converts through the session
# zone; statesweep must read and write the same instants Airflow (session zone UTC) does.
SKEWED_SESSION = {
    "postgresql": {"options": "-c TimeZone=America/New_York"},
    "mariadb": {"init_command": "SET time_zone = '-05:00'"},
}
AIRFLOW_SESSION = {
    "postgresql": {"options": "-c TimeZone=UTC"},
    "mariadb": {"init_command": "SET time_zone = '+00:00'"},
}


@pytest.mark.parametrize(("dialect", "version"), AIRFLOWS, ids=AIRFLOW_IDS)
def test_session_time_zone_does_not_shift_expiry(
    dialect: str, version: str, make_settings: Callable[..., Settings]
) -> None:
    with airflow_schema_database(dialect, version) as url:
        airflow = make_engine(url, connect_args=AIRFLOW_SESSION[dialect])
        sweeper = make_engine(url, connect_args=SKEWED_SESSION[dialect])
        try:
            _check_time_zone_independence(dialect, url, airflow, sweeper, make_settings)
        finally:
            airflow.dispose()
            sweeper.dispose()


def _check_time_zone_independence(dialect: str, url: str, airflow: Engine, sweeper: Engine,
                                  make_settings: Callable[..., Settings]) -> None:
    # A finished run: state of a running one is protected, which is not what this test is about.
    run_pk = dag_run(airflow, "tz", "run", state="success")
    hour = "INTERVAL '1 hour'" if dialect == "postgresql" else "INTERVAL 1 HOUR"
    now = "now()" if dialect == "postgresql" else "UTC_TIMESTAMP(6)"
    key_column = "`key`" if dialect == "mariadb" else "key"
    tables = resolve_tables(sweeper)
    with airflow.begin() as conn:
        for key, sign in (("live", "+"), ("stale", "-")):
            # The timestamps are computed by the server in Airflow's session (UTC); only
            # dialect constants are formatted in.
            conn.execute(tables.task_state.insert().values(
                dag_id="tz", run_id="run", dag_run_id=run_pk, task_id="t",
                **tables.scope_columns(-1, None), key=key, value="v",
                expires_at=literal_column(f"{now} {sign} {hour}"),
                updated_at=literal_column(now)))

    backend = MetastoreStateBackend(make_settings(), sweeper, tables)
    scope = TaskScope("tz", "run", "t")
    assert backend.get(scope, "live") == "v"
    assert backend.get(scope, "stale") is None

    settings = make_settings(database_url=url, run_store_url="memory://")
    summary = run_local(settings, sweeper, tables, memory_store(), batch_size=10)
    assert summary.expected_rows == 1
    with airflow.connect() as conn:
        keys = set(conn.execute(select(tables.task_state.c.key)).scalars())
    assert keys == {"live"}

    # A row statesweep writes with 2 hours' retention expires in 2 hours for Airflow too.
    backend.set(scope, "fresh", "v", retention=dt.timedelta(hours=2))
    minutes = ("extract(epoch from expires_at - now()) / 60" if dialect == "postgresql"
               else "TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(6), expires_at) / 60")
    with airflow.connect() as conn:
        left_minutes = float(conn.execute(text(
            f"SELECT {minutes} FROM task_state_store WHERE dag_run_id = :pk AND "  # noqa: S608
            f"{key_column} = 'fresh'"), {"pk": run_pk}
        ).scalar_one())
        assert 115 <= left_minutes <= 120
        total = conn.execute(select(func.count()).select_from(tables.task_state)).scalar_one()
    assert total == 2


def _expired_state(engine: Engine, dag_id: str, run_id: str, state: str, keys: int) -> int:
    """A dag run in *state* with *keys* rows of task state that expired an hour ago."""
    pk = dag_run(engine, dag_id, run_id, state=state)
    tables = resolve_tables(engine)
    hour_ago = database_now(engine) - dt.timedelta(hours=1)
    with engine.begin() as conn:
        conn.execute(tables.task_state.insert(), [
            {"dag_run_id": pk, "task_id": "t", **tables.scope_columns(-1, None),
             "key": f"k{i}", "dag_id": dag_id, "run_id": run_id, "value": "v",
             "updated_at": hour_ago, "expires_at": hour_ago} for i in range(keys)])
    return pk


def _keys_by_run(engine: Engine) -> dict[str, int]:
    t = resolve_tables(engine).task_state
    with engine.connect() as conn:
        return {str(r[0]): int(r[1]) for r in conn.execute(
            select(t.c.run_id, func.count()).group_by(t.c.run_id))}


def test_state_of_a_queued_or_running_dag_run_is_kept_until_it_finishes(
        engine: Engine, make_settings: Callable[..., Settings]) -> None:
    """Invariant 14: expired state of a queued or running dag run survives a run (its task may
    retry and read it); the first run after the dag run finishes deletes it. The check is in
    each chunk's DELETE, so a dag run that starts between planning and the DELETE is honoured
    too; and the protection can be turned off."""
    for run_id, state in (("queued", "queued"), ("running", "running"), ("done", "success"),
                          ("failed", "failed")):
        _expired_state(engine, "etl", run_id, state, 25)
    settings = make_settings(database_url="sqlite:///unused.db", run_store_url="memory://")
    tables = resolve_tables(engine)
    assert tables.has_run_state
    store = memory_store()
    summary = run_local(settings, engine, tables, store, batch_size=10)
    assert _keys_by_run(engine) == {"queued": 25, "running": 25}
    record = store.get(summary.run_id)
    assert record is not None and (record.rows_deleted, record.protected_rows) == (50, 50)
    assert record.protected_oldest  # the run record says what it kept, and since when
    from workers.cli.render import run_summary
    assert "kept          50 expired rows of queued or running dag runs" in run_summary(record)
    with engine.connect() as conn:
        protected = count_protected(conn, tables, database_now(engine))
    assert protected.rows == 50 and protected.oldest is not None
    assert database_now(engine) - protected.oldest > dt.timedelta(minutes=59)

    with engine.begin() as conn:  # the running one finishes; the queued one starts
        conn.execute(text("UPDATE dag_run SET state = 'success' WHERE run_id = 'running'"))
    run_local(settings, engine, tables, memory_store(), batch_size=10)
    assert _keys_by_run(engine) == {"queued": 25}

    # A dag run that is re-run (cleared) between the plan and the DELETE keeps its state.
    _expired_state(engine, "etl", "cleared", "success", 5)
    cutoff = database_now(engine)
    rng = ChunkRange("ids", 0, 10 ** 9)
    with engine.begin() as conn:
        conn.execute(text("UPDATE dag_run SET state = 'running' WHERE run_id = 'cleared'"))
    assert delete_range(engine, tables, rng, cutoff) == 0
    assert _keys_by_run(engine) == {"queued": 25, "cleared": 5}

    off = make_settings(database_url="sqlite:///unused.db", run_store_url="memory://",
                        protect_unfinished_dag_runs=False)
    run_local(off, engine, tables, memory_store(), batch_size=10)
    assert _keys_by_run(engine) == {}


def test_the_exporter_reports_protected_rows_and_their_age(engine: Engine) -> None:
    """The backlog says how many expired rows are kept for unfinished dag runs and how long
    ago the oldest expired (what the StatesweepProtectedStateTooOld alert reads); with the
    protection off there is nothing protected to report."""
    _expired_state(engine, "etl", "running", "running", 7)
    _expired_state(engine, "etl", "done", "success", 3)
    backlog = read_backlog(engine, "auto", 5000)
    assert (backlog.expired_rows, backlog.protected_rows) == (10, 7)
    assert 3590 < backlog.protected_oldest_age_seconds <= backlog.oldest_expired_age_seconds
    off = read_backlog(engine, "auto", 5000, protect=False)
    assert (off.protected_rows, off.protected_oldest_age_seconds) == (0, 0.0)
