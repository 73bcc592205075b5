"""Airflow 3.4's two extra db-clean rules on its real schema (tests/airflow_schemas), PostgreSQL
and MariaDB: xcom_v1 rows shadowed by the xcom_v2 rows being deleted go (and are archived) with
them, whatever their own timestamp; the rows a task_instance or dag_run delete cascades to in
the attempt tables are archived in the same transaction as their delete (rules.CASCADE_ARCHIVED),
and a batch that fails archives and deletes nothing. Expectations are written out per row."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, Table, func, inspect, select

from tests.airflow_schemas import airflow_schema_database
from tests.integration.test_db_clean import DAY, T, insert, invoke
from workers.db import make_engine
from workers.dbclean import cascade
from workers.dbclean import run as dbclean
from workers.dbclean import statements as sql
from workers.dbclean.rules import ARCHIVE_PREFIX, RULES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TAG = "20260601000000"


@pytest.fixture(params=["postgresql", "mysql"])
def db34(request: pytest.FixtureRequest) -> Iterator[tuple[str, Engine]]:
    with airflow_schema_database(request.param, "3.4.0b2") as url:
        engine = make_engine(url)
        try:
            yield url, engine
        finally:
            engine.dispose()


def _tables(engine: Engine, *names: str) -> dict[str, Table]:
    md = MetaData()
    md.reflect(engine, only=list(names))
    return dict(md.tables)


def _ti(dag_id: str, run_id: str, task_id: str, start: Any) -> dict[str, Any]:
    return {"id": uuid.uuid4(), "dag_id": dag_id, "run_id": run_id, "task_id": task_id,
            "map_index": -1, "start_date": start, "try_number": 1, "pool": "p", "pool_slots": 1}


def _xcom_v1_keys(engine: Engine, name: str = "xcom_v1") -> set[tuple[str, str]]:
    with engine.connect() as conn:
        t = Table(name, MetaData(), autoload_with=conn)
        return {(r.dag_id, r.key) for r in conn.execute(select(t.c.dag_id, t.c.key))}


def _archive(engine: Engine, table: str) -> str | None:
    names = [n for n in inspect(engine).get_table_names()
             if n.startswith(f"{ARCHIVE_PREFIX}{table}__")]
    assert len(names) <= 1, names  # one archive per table per run
    return names[0] if names else None


def shadow_rows(engine: Engine) -> None:
    """Per dag (a, b): one newest dag run whose task instance never started (its own rule keeps
    it), with xcom_v2 rows `k` (old: xcom_v2's rule deletes it) and `keep` (new), and legacy
    xcom_v1 rows, all but `old` written after T: `k` (shadowed by the old `k`), `keep` (its
    xcom_v2 row stays), `solo` (no xcom_v2 row) and `old` (its own timestamp is before T)."""
    ts = _tables(engine, "dag_run", "task_instance", "legacy_task_data_owner", "xcom_v1",
                 "xcom_v2")
    with engine.begin() as conn:
        for n, dag_id in enumerate(("a", "b")):
            ti = _ti(dag_id, "new", "t", None)
            insert(conn, ts["dag_run"], [{"id": n + 1, "dag_id": dag_id, "run_id": "new",
                                          "run_type": "scheduled", "start_date": T + DAY,
                                          "run_after": T, "state": "success"}])
            insert(conn, ts["task_instance"], [ti])
            insert(conn, ts["legacy_task_data_owner"], [
                {"dag_id": dag_id, "task_id": "t", "run_id": "new", "map_index": -1,
                 "task_instance_id": ti["id"]}])
            insert(conn, ts["xcom_v2"], [
                {"id": uuid.uuid4(), "task_instance_id": ti["id"], "key": "k",
                 "timestamp": T - 5 * DAY},
                {"id": uuid.uuid4(), "task_instance_id": ti["id"], "key": "keep",
                 "timestamp": T + DAY}])
            insert(conn, ts["xcom_v1"], [
                {"dag_run_id": n + 1, "dag_id": dag_id, "run_id": "new", "task_id": "t",
                 "map_index": -1, "key": key, "timestamp": when}
                for key, when in (("k", T + 2 * DAY), ("keep", T + 2 * DAY),
                                  ("solo", T + 2 * DAY), ("old", T - 3 * DAY))])


def test_shadowed_xcom_v1_rows_go_with_their_xcom_v2_rows_and_are_archived(
        db34: tuple[str, Engine]) -> None:
    url, engine = db34
    shadow_rows(engine)
    result = invoke(url, "--clean-before-timestamp", T.isoformat(), "--tables", "xcom",
                    "--batch-size", "1", "-y", "--local")
    assert result.exit_code == 0, result.output
    left = {(d, k) for d in "ab" for k in ("keep", "solo")}
    assert _xcom_v1_keys(engine) == left
    archive = _archive(engine, "xcom_v1")
    assert archive is not None
    assert _xcom_v1_keys(engine, archive) == {(d, k) for d in "ab" for k in ("k", "old")}
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(
            Table(archive, MetaData(), autoload_with=conn))).scalar_one() == 4  # each once


def test_cleaning_only_xcom_v2_takes_the_shadowed_rows_and_no_others(
        db34: tuple[str, Engine]) -> None:
    url, engine = db34
    shadow_rows(engine)
    result = invoke(url, "--clean-before-timestamp", T.isoformat(), "--tables", "xcom_v2",
                    "--dag-ids", "a", "-y", "--local", "--skip-archive")
    assert result.exit_code == 0, result.output
    # xcom_v1's own rule was not asked for (`old` stays); b is not one of the dag ids.
    assert _xcom_v1_keys(engine) == ({("a", k) for k in ("keep", "solo", "old")}
                                     | {("b", k) for k in ("k", "keep", "solo", "old")})
    assert _archive(engine, "xcom_v1") is None


def test_without_xcom_v2_the_legacy_table_keeps_its_own_rule_only(
        db34: tuple[str, Engine]) -> None:
    url, engine = db34
    shadow_rows(engine)
    result = invoke(url, "--clean-before-timestamp", T.isoformat(), "--tables", "xcom_v1",
                    "-y", "--local", "--skip-archive")
    assert result.exit_code == 0, result.output
    assert _xcom_v1_keys(engine) == {(d, k) for d in "ab" for k in ("k", "keep", "solo")}


# --- archives of cascaded rows ------------------------------------------------------------------

ATTEMPT_CHILDREN = ("xcom_v2", "rtif_v2", "task_instance_note", "task_reschedule",
                    "hitl_detail")


def cascade_rows(engine: Engine) -> dict[str, int]:
    """An old dag run (dag `old`) with two task instances that never started (only its cascade
    removes them), each with a row in every attempt table and a legacy xcom_v1 and rtif_v1 row
    under its legacy_task_data_owner row; a dynamic region; a task state row that never
    expires (cascaded, not archived by Airflow). The newest run of the dag keeps keep-last
    away from the old one. Returns the rows written per table under the old run."""
    names = ("dag_run", "task_instance", "legacy_task_data_owner", "xcom_v1", "rtif_v1",
             "dynamic_region", "task_state_store", *ATTEMPT_CHILDREN)
    ts = _tables(engine, *names)
    with engine.begin() as conn:
        insert(conn, ts["dag_run"], [
            {"id": 1, "dag_id": "old", "run_id": "r0", "run_type": "scheduled",
             "start_date": T - 9 * DAY, "run_after": T, "state": "success"},
            {"id": 2, "dag_id": "old", "run_id": "r1", "run_type": "scheduled",
             "start_date": T + DAY, "run_after": T, "state": "success"}])
        for i in range(2):
            ti = _ti("old", "r0", f"t{i}", None)
            insert(conn, ts["task_instance"], [ti])
            coords = {"dag_id": "old", "task_id": f"t{i}", "run_id": "r0", "map_index": -1}
            insert(conn, ts["legacy_task_data_owner"], [{**coords, "task_instance_id": ti["id"]}])
            insert(conn, ts["xcom_v1"], [{**coords, "dag_run_id": 1, "key": "k",
                                          "timestamp": T + DAY}])
            insert(conn, ts["rtif_v1"], [{**coords, "rendered_fields": "{}"}])
            insert(conn, ts["xcom_v2"], [{"id": uuid.uuid4(), "task_instance_id": ti["id"],
                                          "key": "k", "timestamp": T + DAY}])
            insert(conn, ts["rtif_v2"], [{"id": uuid.uuid4(), "task_instance_id": ti["id"],
                                          "rendered_fields": "{}"}])
            for name in ("task_instance_note", "task_reschedule", "hitl_detail"):
                row: dict[str, Any] = {"ti_id": ti["id"], "start_date": T + DAY,
                                       **dict.fromkeys(("options", "params", "params_input"),
                                                       "{}")}
                insert(conn, ts[name], [{k: v for k, v in row.items() if k in ts[name].c}])
        insert(conn, ts["dynamic_region"], [
            {"id": uuid.uuid4(), "dag_id": "old", "run_id": "r0", "node_id": "n",
             "family_root_id": uuid.uuid4(), "path": b"p"}])
        tss = ts["task_state_store"]
        insert(conn, tss, [{"id": 1, "dag_run_id": 1, "task_id": "t0", "key": "k",
                            "dag_id": "old", "run_id": "r0", "value": "v", "updated_at": T,
                            "expires_at": None, "region_index": -1,
                            "region_id": uuid.UUID(int=0)}])
    return {n: 2 for n in ("task_instance", "legacy_task_data_owner", "xcom_v1", "rtif_v1",
                           *ATTEMPT_CHILDREN)} | {"dynamic_region": 1, "task_state_store": 1}


def _count(engine: Engine, name: str) -> int:
    with engine.connect() as conn:
        t = Table(name, MetaData(), autoload_with=conn)
        return int(conn.execute(select(func.count()).select_from(t)).scalar_one())


def _dag_run_chunk(engine: Engine) -> tuple[Table, list[Any], list[dbclean.Dependant]]:
    with engine.connect() as conn:
        t = sql.reflect(conn, "dag_run")
        cond = sql.eligible(conn, RULES["3.4"]["dag_run"], t, T)
        return t, cond, dbclean._dependants(conn, cascade.ForeignKeys(conn), t)


def _archives(engine: Engine, dependants: list[dbclean.Dependant]) -> dict[str, Table]:
    return cascade.cascade_archives(engine, "3.4", "dag_run", f"{ARCHIVE_PREFIX}dag_run__{TAG}",
                                    [target for _, target, _ in dependants])


def test_a_dag_runs_cascaded_attempt_rows_are_archived_as_airflow_archives_them(
        db34: tuple[str, Engine]) -> None:
    _, engine = db34
    written = cascade_rows(engine)
    t, cond, dependants = _dag_run_chunk(engine)
    archives = _archives(engine, dependants)
    assert set(archives) == set(written) - {"task_state_store"}
    assert {a.name for a in archives.values()} == {f"{ARCHIVE_PREFIX}{n}__{TAG}" for n in archives}
    # 3.3's rules, and tables other than task_instance and dag_run, archive no cascade.
    assert cascade.cascade_archives(engine, "3.3", "dag_run", f"{ARCHIVE_PREFIX}dag_run__{TAG}",
                                    [target for _, target, _ in dependants]) == {}
    for path, target, tables in dependants:
        while True:  # batches of one row: each its own transaction
            with engine.begin() as conn:
                rows, _ = cascade.delete_batch_from(conn, tables, path, cond, 1,
                                                    archive=archives.get(target.name))
            if rows == 0:
                break
    with engine.begin() as conn:
        assert sql.move_chunk(conn, t, None, cond, None, None) == 1
    for name, n in written.items():
        if name == "task_state_store":  # cascaded, and not archived (as in Airflow)
            assert _count(engine, name) == 0
            assert _archive(engine, name) is None
            continue
        left = _count(engine, name)
        assert (left, _count(engine, archives[name].name)) == (0, n), name


def test_a_failed_batch_archives_nothing_and_deletes_nothing(db34: tuple[str, Engine]) -> None:
    _, engine = db34
    written = cascade_rows(engine)
    _, cond, dependants = _dag_run_chunk(engine)
    archives = _archives(engine, dependants)
    [(path, target, tables)] = [d for d in dependants if d[1].name == "xcom_v2"]

    class Crash(Exception):
        pass

    with pytest.raises(Crash), engine.begin() as conn:
        assert cascade.delete_batch_from(conn, tables, path, cond, 0,
                                         archive=archives["xcom_v2"])[0] == 2
        raise Crash  # the process dies before commit
    assert (_count(engine, "xcom_v2"), _count(engine, archives["xcom_v2"].name)) == (2, 0)
    with engine.begin() as conn:  # the next try moves each row once
        assert cascade.delete_batch_from(conn, tables, path, cond, 0,
                                         archive=archives["xcom_v2"])[0] == written["xcom_v2"]
    with engine.begin() as conn:
        assert cascade.delete_batch_from(conn, tables, path, cond, 0,
                                         archive=archives["xcom_v2"])[0] == 0
    assert (_count(engine, "xcom_v2"), _count(engine, archives["xcom_v2"].name)) == (0, 2)
    # Making the run's archives again takes the ones that exist.
    assert _archives(engine, dependants)["xcom_v2"].name == archives["xcom_v2"].name


def test_a_local_run_archives_a_dag_runs_cascaded_attempt_rows(db34: tuple[str, Engine]) -> None:
    """End to end (`db-clean --local`): the dag_run chunk's dependant batches copy the rows
    Airflow 3.4 archives with the cascade into the run's archive of each table."""
    url, engine = db34
    written = cascade_rows(engine)
    result = invoke(url, "--clean-before-timestamp", T.isoformat(), "--tables", "dag_run",
                    "--batch-size", "1", "-y", "--local")
    assert result.exit_code == 0, result.output
    for name, n in written.items():
        assert _count(engine, name) == 0, name
        archive = _archive(engine, name)
        if name == "task_state_store":  # cascaded, and not archived (as in Airflow)
            assert archive is None
        else:
            assert archive is not None and _count(engine, archive) == n, name
