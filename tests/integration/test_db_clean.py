"""``statesweep db-clean`` on Airflow's real schemas (tests/airflow_schemas), PostgreSQL and
MariaDB, 3.3.2 and 3.4.0b2: the rows left are the rows Airflow's rules leave (an expectation
computed here in Python from the rows written, not from statesweep's SQL), archived rows are the
deleted rows, --skip-archive builds nothing, a crash inside a chunk loses and duplicates nothing,
and bad input deletes nothing."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, MetaData, Table, func, inspect, select
from sqlalchemy import types as sqltypes

from tests.airflow_schemas import airflow_schema_database
from workers.cli import cli
from workers.db import make_engine
from workers.dbclean import run as dbclean
from workers.dbclean.rules import ARCHIVE_PREFIX
from workers.exit_codes import EXIT_BAD_ARGUMENT, EXIT_REFUSED

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

T = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)  # --clean-before-timestamp of every test
DAY = dt.timedelta(days=1)
DAGS = ("alpha", "beta", "gamma")
RUNS_PER_DAG = 6
TIS_PER_RUN = 3
VERSIONS = {"3.3.2": "3.3", "3.4.0b2": "3.4"}


# --- writing Airflow rows -----------------------------------------------------------------------


def _filler(column: Any) -> Any:
    """A value for a NOT NULL column without a default that the test does not care about."""
    t = column.type
    if isinstance(t, sqltypes.Boolean):
        return False
    if isinstance(t, sqltypes.Integer):
        return 1
    if isinstance(t, sqltypes.Float | sqltypes.Numeric):
        return 0.0
    if isinstance(t, sqltypes.DateTime):
        return T
    if isinstance(t, sqltypes.JSON):
        return {}
    if isinstance(t, sqltypes.Uuid):
        return uuid.UUID(int=0)
    if isinstance(t, sqltypes.LargeBinary | sqltypes._Binary):
        return bytes(16)
    return "x"


def insert(conn: Any, t: Table, rows: list[dict[str, Any]]) -> None:
    """Insert *rows*, each completed with fillers for the NOT NULL columns it leaves out."""
    if not rows:
        return
    need = [c for c in t.c if not c.nullable and c.server_default is None
            and not (c.primary_key and c.autoincrement is True)]
    full = []
    for row in rows:
        r = dict(row)
        for c in need:
            if c.name not in r and not (c.primary_key and isinstance(c.type, sqltypes.Integer)):
                r[c.name] = _filler(c)
        for c in t.c:  # a UUID in a BINARY(16) column (MySQL's region_id) is its 16 bytes
            if isinstance(r.get(c.name), uuid.UUID) and isinstance(c.type, sqltypes._Binary):
                r[c.name] = r[c.name].bytes
        full.append(r)
    conn.execute(t.insert(), full)


def old_dag_runs(conn: Any, md: MetaData, dag_id: str, runs: dict[int, int]) -> None:
    """Finished manual dag runs of *dag_id* a month before T, by id, each with the given number
    of task instances that never started (their own rule keeps them: only the dag run's
    cascade, or its dependant batches, take them)."""
    insert(conn, md.tables["dag_run"], [
        {"id": rid, "dag_id": dag_id, "run_id": f"r{rid}", "run_type": "manual",
         "start_date": T - 30 * DAY, "run_after": T - 30 * DAY, "state": "success"}
        for rid in runs])
    insert(conn, md.tables["task_instance"], [
        {"id": uuid.uuid4(), "dag_id": dag_id, "run_id": f"r{rid}", "task_id": f"t{i}",
         "start_date": None, "try_number": 1, "pool": "p", "pool_slots": 1}
        for rid, n in runs.items() for i in range(n)])


@dataclass
class Data:
    """What was written, enough to compute Airflow's result independently."""

    version: str
    dag_runs: list[dict[str, Any]] = field(default_factory=list)  # id, dag_id, run_id, ...
    tis: list[dict[str, Any]] = field(default_factory=list)
    state: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)


def populate(engine: Engine, version: str) -> Data:
    """Dag runs (scheduled and manual, old and new, some never started), their task instances
    (old, new, never started), task state (expired, not, never), log and job rows around T."""
    md = MetaData()
    md.reflect(engine, only=["dag_run", "task_instance", "task_state_store", "log", "job"])
    dr, ti, tss = md.tables["dag_run"], md.tables["task_instance"], md.tables["task_state_store"]
    data = Data(version)
    run_pk = 0
    for d, dag_id in enumerate(DAGS):
        for n in range(RUNS_PER_DAG):
            run_pk += 1
            # Runs 0-3 start before T, 4-5 after; the last old one of alpha is manual, so the
            # newest *non-manual* old run decides what keep-last keeps. gamma's runs are all old.
            offset = (n - 4) * DAY if dag_id != "gamma" else (n - 10) * DAY
            never_started = dag_id == "beta" and n == 0
            start = None if never_started else T + offset + d * dt.timedelta(hours=1)
            manual = (dag_id, n) in (("alpha", 3), ("gamma", 5))
            run_type = "manual" if manual else "scheduled"
            data.dag_runs.append({"id": run_pk, "dag_id": dag_id, "run_id": f"r{n}",
                                  "run_type": run_type, "start_date": start, "state": "success",
                                  "run_after": T + offset})
            for k in range(TIS_PER_RUN):
                ti_start = None if k == 2 else T + (k - 1) * 2 * DAY + n * dt.timedelta(minutes=1)
                data.tis.append({"id": uuid.uuid4(), "dag_id": dag_id, "run_id": f"r{n}",
                                 "task_id": f"t{k}", "start_date": ti_start, "try_number": 1,
                                 "pool": "default_pool", "pool_slots": 1})
                expires = (None if k == 2 else T + (k - 1) * DAY)
                row = {"id": len(data.state) + 1, "dag_run_id": run_pk, "task_id": f"t{k}",
                       "key": "k", "dag_id": dag_id, "run_id": f"r{n}", "value": "v",
                       "updated_at": T, "expires_at": expires}
                row.update({"region_index": -1, "region_id": uuid.UUID(int=0)}
                           if "region_id" in tss.c else {"map_index": -1})
                data.state.append(row)
    for i in range(40):
        data.logs.append({"id": i + 1, "dttm": T + (i - 20) * dt.timedelta(hours=1),
                          "dag_id": DAGS[i % 3], "event": "e"})
        data.jobs.append({"id": i + 1, "latest_heartbeat": T + (i - 25) * dt.timedelta(hours=1),
                          "dag_id": DAGS[i % 3] if i % 4 else None})
    with engine.begin() as conn:
        insert(conn, dr, data.dag_runs)
        insert(conn, ti, data.tis)
        insert(conn, tss, data.state)
        insert(conn, md.tables["log"], data.logs)
        insert(conn, md.tables["job"], data.jobs)
    return data


def expected(data: Data, dag_ids: tuple[str, ...] = ()) -> dict[str, set[Any]]:
    """The primary keys Airflow's rules leave, computed from what was written: task instances
    (start_date < T) and task state (expires_at < T) first, then dag runs (start_date < T, not
    the newest non-manual run of their dag), cascading to their task instances and state; log
    (dttm) and job (latest_heartbeat) on their own."""
    def chosen(row: dict[str, Any]) -> bool:
        return not dag_ids or row["dag_id"] in dag_ids

    def old(value: dt.datetime | None) -> bool:
        return value is not None and value < T

    tis = {r["id"]: r for r in data.tis if not (chosen(r) and old(r["start_date"]))}
    state = {r["id"]: r for r in data.state if not (chosen(r) and old(r["expires_at"]))}
    newest: dict[str, dt.datetime] = {}
    for r in data.dag_runs:
        if r["run_type"] != "manual" and r["start_date"] is not None:
            newest[r["dag_id"]] = max(newest.get(r["dag_id"], r["start_date"]), r["start_date"])
    gone_runs = {r["id"] for r in data.dag_runs if chosen(r) and old(r["start_date"])
                 and newest.get(r["dag_id"]) != r["start_date"]}
    runs = {r["id"]: r for r in data.dag_runs if r["id"] not in gone_runs}
    run_keys = {(r["dag_id"], r["run_id"]) for r in runs.values()}
    return {
        "dag_run": set(runs),
        "task_instance": {k for k, r in tis.items() if (r["dag_id"], r["run_id"]) in run_keys},
        "task_state_store": {k for k, r in state.items() if r["dag_run_id"] in runs},
        "log": {r["id"] for r in data.logs if not (chosen(r) and old(r["dttm"]))},
        "job": {r["id"] for r in data.jobs
                if not ((not dag_ids or r["dag_id"] in dag_ids) and old(r["latest_heartbeat"]))},
    }


def keys(engine: Engine, name: str) -> set[Any]:
    with engine.connect() as conn:
        t = Table(name, MetaData(), autoload_with=conn)
        pk = t.primary_key.columns
        rows = conn.execute(select(*pk)).all()
    return {_norm(r[0]) for r in rows} if len(pk) == 1 else {tuple(r) for r in rows}


def _norm(value: Any) -> Any:
    if isinstance(value, str) and len(value) == 36 and value.count("-") == 4:
        return uuid.UUID(value)
    return value


def archives(engine: Engine) -> list[str]:
    return sorted(n for n in inspect(engine).get_table_names() if n.startswith(ARCHIVE_PREFIX))


@pytest.fixture(params=[("postgresql", "3.3.2"), ("mysql", "3.3.2"), ("postgresql", "3.4.0b2"),
                        ("mysql", "3.4.0b2")], ids=lambda p: f"{p[0]}-{p[1]}")
def airflow_db(request: pytest.FixtureRequest) -> Iterator[tuple[str, Engine, Data]]:
    dialect, version = request.param
    with airflow_schema_database(dialect, version) as url:
        engine = make_engine(url)
        try:
            yield url, engine, populate(engine, version)
        finally:
            engine.dispose()


@pytest.fixture(params=[("postgresql", "3.3.2"), ("mysql", "3.4.0b2")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def one_db(request: pytest.FixtureRequest) -> Iterator[tuple[str, Engine, Data]]:
    """Fewer combinations, for the slower or narrower tests."""
    dialect, version = request.param
    with airflow_schema_database(dialect, version) as url:
        engine = make_engine(url)
        try:
            yield url, engine, populate(engine, version)
        finally:
            engine.dispose()


@pytest.fixture
def mariadb_33() -> Iterator[Engine]:
    """An empty Airflow 3.3.2 schema on MariaDB, for the MySQL-only statements."""
    with airflow_schema_database("mysql", "3.3.2") as url:
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def invoke(url: str, *args: str, stdin: str | None = None) -> Any:
    env = {"STATESWEEP_DATABASE_URL": url, "STATESWEEP_RUN_STORE_URL": "memory://"}
    return CliRunner().invoke(cli, ["db-clean", *args], env=env, input=stdin,
                              catch_exceptions=False)


TABLES = ("dag_run", "task_instance", "task_state_store", "log", "job")


def snapshot(engine: Engine) -> dict[str, set[Any]]:
    return {name: keys(engine, name) for name in TABLES}


# --- the tests ----------------------------------------------------------------------------------


def test_leaves_the_rows_airflows_rules_leave(airflow_db: tuple[str, Engine, Data]) -> None:
    url, engine, data = airflow_db
    before = snapshot(engine)
    result = invoke(url, "--clean-before-timestamp", T.isoformat(), "--batch-size", "4", "-y",
                    "--local")
    assert result.exit_code == 0, result.output
    after = snapshot(engine)
    want = expected(data)
    for name in TABLES:
        assert after[name] == want[name], name
    # Something was deleted in every table, and keep-last held: each dag's newest non-manual
    # run that started before T is still there although it is old.
    assert all(after[n] < before[n] for n in TABLES)
    kept = {(r["dag_id"], r["run_id"]) for r in data.dag_runs if r["id"] in after["dag_run"]
            and r["start_date"] is not None and r["start_date"] < T}
    assert kept == {("gamma", "r4")}  # gamma's r5 is newer, but manual


def test_archived_rows_are_exactly_the_deleted_rows(airflow_db: tuple[str, Engine, Data]) -> None:
    url, engine, _ = airflow_db
    before = snapshot(engine)
    result = invoke(url, "--clean-before-timestamp", T.isoformat(), "--tables", "log,job",
                    "--batch-size", "3", "-y", "--local", "--format", "json")
    assert result.exit_code == 0, result.output
    import json

    report = {t["table"]: t for t in json.loads(result.stdout)["tables"]}
    made = archives(engine)
    assert len(made) == 2, made  # one archive per table per run, not one per chunk
    after = snapshot(engine)
    for name in ("log", "job"):
        [archive] = [a for a in made if a.startswith(f"{ARCHIVE_PREFIX}{name}__")]
        with engine.connect() as conn:
            ids = [r[0] for r in conn.execute(select(
                Table(archive, MetaData(), autoload_with=conn).c.id))]
        assert len(ids) == len(set(ids))
        assert set(ids) == before[name] - after[name]
        assert ids
        assert report[name]["deleted"] == report[name]["eligible"] == len(ids)
        assert report[name]["chunks"] >= len(ids) // 3  # at most 3 rows a chunk
    assert after["dag_run"] == before["dag_run"]  # tables not named are untouched


def test_skip_archive_builds_no_table(one_db: tuple[str, Engine, Data]) -> None:
    url, engine, data = one_db
    result = invoke(url, "--clean-before-timestamp", T.isoformat(), "--skip-archive", "-y",
                    "--local", "--batch-size", "5")
    assert result.exit_code == 0, result.output
    assert archives(engine) == []
    assert snapshot(engine)["log"] == expected(data)["log"]


def test_dry_run_counts_and_deletes_nothing(one_db: tuple[str, Engine, Data]) -> None:
    url, engine, data = one_db
    before = snapshot(engine)
    result = invoke(url, "--clean-before-timestamp", T.isoformat(), "--dry-run",
                    "--format", "json")
    assert result.exit_code == 0, result.output
    import json

    counts = {t["table"]: t["eligible"] for t in json.loads(result.output)["tables"]}
    assert counts["log"] == len(before["log"] - expected(data)["log"])
    assert counts["job"] == len(before["job"] - expected(data)["job"])
    assert snapshot(engine) == before and archives(engine) == []


def test_dag_ids_narrow_every_table(one_db: tuple[str, Engine, Data]) -> None:
    url, engine, data = one_db
    result = invoke(url, "--clean-before-timestamp", T.isoformat(), "--dag-ids", "gamma",
                    "--tables", "dag_run,log,task_state_store", "-y", "--local")
    assert result.exit_code == 0, result.output
    want = expected(data, dag_ids=("gamma",))
    after = snapshot(engine)
    for name in ("dag_run", "log", "task_state_store"):
        assert after[name] == want[name], name


def test_a_failure_inside_a_chunk_loses_nothing_and_archives_nothing_twice(
        one_db: tuple[str, Engine, Data]) -> None:
    _, engine, data = one_db
    before = snapshot(engine)
    moved: list[int] = []

    def crash(table: str, rows: int) -> None:
        if table == "log" and len(moved) == 2:
            raise RuntimeError("crash inside the chunk's transaction")
        moved.append(rows)

    request = dbclean.Request(before=T, tables=("log",), batch_size=4)
    with pytest.raises(RuntimeError):
        dbclean.clean(engine, request, on_chunk=crash)
    mid = keys(engine, "log")
    [first] = archives(engine)
    # Two transactions committed (sized by time: at most 4 rows each), the third rolled back.
    assert len(_archived(engine, first)) == len(before["log"] - mid) == sum(moved) > 0
    time.sleep(1.1)  # the next run's archive is its own
    dbclean.clean(engine, request)
    assert keys(engine, "log") == expected(data)["log"]
    archived = [i for a in archives(engine) for i in _archived(engine, a)]
    assert len(archived) == len(set(archived))  # none twice
    assert set(archived) == before["log"] - expected(data)["log"]  # none lost


def _archived(engine: Engine, archive: str) -> list[Any]:
    with engine.connect() as conn:
        t = Table(archive, MetaData(), autoload_with=conn)
        return [r[0] for r in conn.execute(select(t.c.id))]


N_KILL = 20000


def _count(engine: Engine, name: str) -> int:
    with engine.connect() as conn:
        t = Table(name, MetaData(), autoload_with=conn)
        return int(conn.execute(select(func.count()).select_from(t)).scalar_one())


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_a_killed_local_run_loses_nothing_and_archives_nothing_twice(dialect: str) -> None:
    """SIGKILL a `db-clean --local` process between chunks or inside one: every row is either
    still in log or in the archive, never both and never twice; a second run finishes it."""
    with airflow_schema_database(dialect, "3.3.2") as url:
        engine = make_engine(url)
        try:
            md = MetaData()
            md.reflect(engine, only=["log"])
            rows = [{"id": i + 1, "dttm": T - (i + 1) * dt.timedelta(seconds=1), "event": "e"}
                    for i in range(N_KILL)]
            with engine.begin() as conn:
                insert(conn, md.tables["log"], rows)
            env = {**os.environ, "STATESWEEP_DATABASE_URL": url,
                   "STATESWEEP_RUN_STORE_URL": "memory://"}
            cmd = [sys.executable, "-c", "from workers.cli import main; main()", "db-clean",
                   "--clean-before-timestamp", T.isoformat(), "--tables", "log",
                   "--batch-size", "20", "-y", "--local"]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if archives(engine) and _count(engine, "log") < N_KILL - 500:
                    break  # some chunks committed: kill it mid-run
                time.sleep(0.02)
            assert proc.poll() is None, proc.communicate()[1].decode()
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            left = keys(engine, "log")
            assert 0 < len(left) < N_KILL, "the kill did not land mid-run"
            [first] = archives(engine)
            archived = _archived(engine, first)
            assert len(archived) == len(set(archived))
            assert set(archived) | left == set(range(1, N_KILL + 1))  # nothing lost
            assert not set(archived) & left  # nothing both archived and kept
            time.sleep(1.1)
            finish = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
            assert finish.returncode == 0, finish.stderr
            everything = [i for a in archives(engine) for i in _archived(engine, a)]
            assert sorted(everything) == list(range(1, N_KILL + 1))  # each exactly once
            assert keys(engine, "log") == set()
        finally:
            engine.dispose()


#: Bad db-clean arguments and the option each one's error line names.
BAD_INPUT = [
    ((), "--clean-before-timestamp"),
    (("--clean-before-timestamp", "yesterday"), "--clean-before-timestamp"),
    (("--clean-before-timestamp", T.isoformat(), "--tables", "log,nosuch"), "--tables"),
    (("--clean-before-timestamp", T.isoformat(), "--batch-size", "-3"), "--batch-size"),
]


@pytest.mark.parametrize(("args", "names"), BAD_INPUT)
def test_bad_input_is_one_line_and_deletes_nothing(one_db: tuple[str, Engine, Data],
                                                   args: tuple[str, ...], names: str) -> None:
    url, engine, _ = one_db
    before = snapshot(engine)
    result = invoke(url, *args, "-y", "--local")
    assert result.exit_code == EXIT_BAD_ARGUMENT, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and names in lines[0], result.output
    assert "Traceback" not in result.output
    assert snapshot(engine) == before and archives(engine) == []


def test_without_yes_an_unconfirmed_run_deletes_nothing(one_db: tuple[str, Engine, Data]) -> None:
    url, engine, _ = one_db
    before = snapshot(engine)
    result = invoke(url, "--clean-before-timestamp", T.isoformat(), "--local", stdin="no\n")
    assert result.exit_code == EXIT_REFUSED, result.output
    assert snapshot(engine) == before and archives(engine) == []
    confirmed = invoke(url, "--clean-before-timestamp", T.isoformat(), "--local", "--tables",
                       "log", stdin="delete rows\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert keys(engine, "log") < before["log"]


def test_archives_are_listed_exported_and_dropped(one_db: tuple[str, Engine, Data],
                                                  tmp_path: Any) -> None:
    url, engine, _ = one_db
    before = keys(engine, "log")
    assert invoke(url, "--clean-before-timestamp", T.isoformat(), "--tables", "log", "-y",
                  "--local").exit_code == 0
    [archive] = archives(engine)
    listed = invoke(url, "archives")
    assert listed.exit_code == 0 and archive in listed.output
    for fmt in ("csv", "json"):
        out = tmp_path / fmt
        out.mkdir()
        exported = invoke(url, "export", "--export-format", fmt, "--output-path", str(out))
        assert exported.exit_code == 0, exported.output
        text = (out / f"{archive}.{fmt}").read_text()
        if fmt == "json":
            import json

            rows = json.loads(text)
            assert {r["id"] for r in rows} == before - keys(engine, "log")
        else:
            assert len(text.strip().splitlines()) == 1 + len(before - keys(engine, "log"))
    dropped = invoke(url, "drop", "-y")
    assert dropped.exit_code == 0, dropped.output
    assert archives(engine) == []
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(
            Table("log", MetaData(), autoload_with=conn))).scalar_one() == len(
            keys(engine, "log"))


def pin_an_old_dags_version(engine: Engine, data: Data) -> uuid.UUID:
    """An old dag ("old") whose only version a kept task instance still references, so that
    deleting the dag cascades to the version and ON DELETE RESTRICT refuses; the version id."""
    md = MetaData()
    md.reflect(engine, only=["dag_bundle", "dag", "dag_version", "task_instance"])
    version_id = uuid.uuid4()
    with engine.begin() as conn:
        insert(conn, md.tables["dag_bundle"], [{"name": "x"}])
        insert(conn, md.tables["dag"], [{"dag_id": "old", "bundle_name": "x",
                                         "last_parsed_time": T - 10 * DAY,
                                         "partition_mapper_info": "{}"}])
        insert(conn, md.tables["dag_version"], [{"id": version_id, "dag_id": "old",
                                                 "version_number": 1,
                                                 "created_at": T - 10 * DAY}])
        ti = md.tables["task_instance"]
        newest = next(r for r in data.tis if r["dag_id"] == "alpha" and r["run_id"] == "r5"
                      and r["start_date"] is not None and r["start_date"] >= T)
        conn.execute(ti.update().where(ti.c.id == newest["id"])
                     .values(dag_version_id=version_id))
    return version_id


def test_a_table_whose_delete_fails_is_named_and_the_others_are_cleaned(
        one_db: tuple[str, Engine, Data]) -> None:
    """An old dag whose only version a task instance still references: its delete cascades to
    that version, which ON DELETE RESTRICT refuses. The dag is reported failed in one line, exit
    1, no traceback; log, cleaned after it, is cleaned all the same."""
    url, engine, data = one_db
    version_id = pin_an_old_dags_version(engine, data)
    result = invoke(url, "--clean-before-timestamp", T.isoformat(), "--tables", "dag,log",
                    "-y", "--local")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "dag:" in errors[0], result.output
    assert "dag: FAILED" in result.output
    assert keys(engine, "dag") == {"old"} and keys(engine, "dag_version") == {version_id}
    assert keys(engine, "log") == expected(data)["log"]


def test_a_dag_run_that_became_its_dags_last_after_the_cut_is_kept(
        one_db: tuple[str, Engine, Data]) -> None:
    """The chunk is cut while gamma's r3 is eligible; then gamma's newest non-manual run (r4)
    goes. The chunk's DELETE re-checks keep-last and leaves r3, the new last run."""
    from workers.dbclean import statements as sql
    from workers.dbclean.rules import RULES

    _, engine, data = one_db
    version = VERSIONS[data.version]
    rule = RULES[version]["dag_run"]
    with engine.begin() as conn:
        t = sql.reflect(conn, "dag_run")
        cond = sql.eligible(conn, rule, t, T)
        hi = sql.next_bound(conn, t, cond, None, 1000)
        planned = sql.count(conn, t, cond)
    with engine.begin() as conn:
        conn.execute(t.delete().where(t.c.dag_id == "gamma", t.c.run_id == "r4"))
    with engine.begin() as conn:
        rows = sql.move_chunk(conn, t, None, cond, None, hi)
    assert rows == planned - 1
    left = {(r.dag_id, r.run_id) for r in _rows(engine, t)}
    assert ("gamma", "r3") in left and ("gamma", "r2") not in left


def _rows(engine: Engine, t: Table) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(t.c.dag_id, t.c.run_id)))


def test_a_dag_runs_dependants_go_first_in_batches_of_the_batch_size(
        one_db: tuple[str, Engine, Data]) -> None:
    """An old dag run with 40 task instances that never started (their own rule keeps them)
    and 12 state rows that never expire: cleaning dag_run with --batch-size 5 deletes them in
    batches of at most 5 before the run's own chunk, so its cascade has nothing left."""
    from structlog.testing import capture_logs

    _, engine, data = one_db
    md = MetaData()
    md.reflect(engine, only=["dag_run", "task_instance", "task_state_store"])
    tss = md.tables["task_state_store"]
    with engine.begin() as conn:
        old_dag_runs(conn, md, "big", {999: 40})
        layout = ({"region_index": -1, "region_id": uuid.UUID(int=0)}
                  if "region_id" in tss.c else {"map_index": -1})
        insert(conn, tss, [{"id": 10000 + i, "dag_run_id": 999, "task_id": f"t{i}", "key": "k",
                            "dag_id": "big",
                            "run_id": "r999", "value": "v", "updated_at": T, "expires_at": None,
                            **layout} for i in range(12)])
    request = dbclean.Request(before=T, tables=("dag_run",), batch_size=5, skip_archive=True)
    with capture_logs() as logs:
        report = dbclean.clean(engine, request)
    batches = [e for e in logs if e["event"] == "db_clean_dependants_deleted"]
    assert batches and all(0 < e["rows"] <= 5 for e in batches)
    by_table = {name: sum(e["rows"] for e in batches if e["dependant"] == name)
                for name in ("task_instance", "task_state_store")}
    assert by_table["task_instance"] >= 40 and by_table["task_state_store"] >= 12
    chunks = [e for e in logs if e["event"] == "db_clean_chunk_moved"]
    assert all(e["rows"] <= 5 for e in chunks)
    [dag_run] = [r for r in report.tables if r.table == "dag_run"]
    assert dag_run.dependants >= 52
    assert 999 not in keys(engine, "dag_run")
    with engine.connect() as conn:
        ti = md.tables["task_instance"]
        assert conn.execute(select(func.count()).select_from(ti)
                            .where(ti.c.dag_id == "big")).scalar_one() == 0
    want = expected(data)
    assert keys(engine, "dag_run") == want["dag_run"]
    assert keys(engine, "task_instance") == want["task_instance"]


def test_each_dependant_batch_starts_at_the_root_row_the_last_one_ended_on(
        one_db: tuple[str, Engine, Data]) -> None:
    """Two old dag runs (1001: 5 task instances, 1002: 7): batches of 3 task instances under
    them, each from the root key the one before ended on, take 3, 3 and 3 (the last from
    1002 on only), then the rest; the last root key never goes back, and a batch from past
    the last dag run finds none."""
    from workers.dbclean import cascade
    from workers.dbclean import statements as sql

    _, engine, _ = one_db
    md = MetaData()
    md.reflect(engine, only=["dag_run", "task_instance"])
    with engine.begin() as conn:
        old_dag_runs(conn, md, "keyset", {1001: 5, 1002: 7})
    with engine.connect() as conn:
        t = sql.reflect(conn, "dag_run")
        [(path, _, tables)] = [d for d in dbclean._dependants(conn, cascade.ForeignKeys(conn), t)
                               if d[1].name == "task_instance" and len(d[0]) == 1]
    root_cond = [t.c.id.in_([1001, 1002])]
    batches, after = [], None
    while True:
        with engine.begin() as conn:
            rows, last = cascade.delete_batch_from(conn, tables, path, root_cond, 3, after=after)
        if rows == 0:
            assert last is None
            break
        batches.append((rows, last))
        after = last
    assert [rows for rows, _ in batches] == [3, 3, 3, 3]
    lasts = [last[0] for _, last in batches]
    assert lasts == [1001, 1002, 1002, 1002]
    with engine.begin() as conn:
        assert cascade.delete_batch_from(conn, tables, path, root_cond, 3, after=(1003,)) \
            == (0, None)
        ti = md.tables["task_instance"]
        assert conn.execute(select(func.count()).select_from(ti)
                            .where(ti.c.dag_id == "keyset")).scalar_one() == 0


def wait_for_lock_waiter(engine: Engine, timeout: float = 30) -> None:
    """Until a session of this database waits for a row lock: PostgreSQL's is the fault
    tests' (tests.reliability.faults); MariaDB's reads innodb_trx."""
    from sqlalchemy import text

    if engine.dialect.name == "postgresql":
        from tests.reliability.faults import wait_for_lock_waiter as pg_waiter

        pg_waiter(engine, timeout)
        return
    sql = text("SELECT 1 FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(sql).first() is not None:
                return

        # Not faster: InnoDB refreshes innodb_trx only when it was not read for 100 ms
        # (its trx_i_s cache), so a poll every 20 ms never saw the waiter.
        time.sleep(0.25)
    raise TimeoutError(f"no session waited for a row lock within {timeout}s")


def test_a_dependant_row_changed_while_its_batch_waits_is_deleted_by_a_later_batch(
        one_db: tuple[str, Engine, Data]) -> None:
    """A task instance under a dag_run chunk, updated by another transaction while a dependant
    batch waits for its row lock: no row is lost or left. On PostgreSQL the batch (one
    statement, its DELETE finding the rows it locked by ctid) locks the row's new version, which
    its snapshot does not see, so it deletes the other three and the next batch the fourth; on
    MariaDB the batch locks and deletes all four."""
    import threading

    from sqlalchemy import update
    from structlog.testing import capture_logs

    from workers.dbclean import cascade
    from workers.dbclean import statements as sql

    _, engine, _ = one_db
    md = MetaData()
    md.reflect(engine, only=["dag_run", "task_instance"])
    ti = md.tables["task_instance"]
    with engine.begin() as conn:
        old_dag_runs(conn, md, "waits", {1001: 4})
    with engine.connect() as conn:
        t = sql.reflect(conn, "dag_run")
        deps = [d for d in dbclean._dependants(conn, cascade.ForeignKeys(conn), t)
                if d[1].name == "task_instance" and len(d[0]) == 1]
    # Batches start at a twentieth of the batch size: 4, the dag run's task instances.
    request = dbclean.Request(before=T, tables=("dag_run",), batch_size=80, skip_archive=True)
    sizes = dbclean.Sizes(batch_size=80, target_ms=10_000)
    done: list[int] = []
    with engine.connect() as holder, capture_logs() as logs:
        with holder.begin():
            holder.execute(update(ti).where(ti.c.dag_id == "waits", ti.c.task_id == "t2")
                           .values(pool="changed"))
            worker = threading.Thread(target=lambda: done.append(dbclean._delete_dependants(
                engine, request, deps, t, [t.c.id == 1001], sizes)))
            worker.start()
            wait_for_lock_waiter(engine)
        worker.join(30)
    assert done == [4]
    batches = [e["rows"] for e in logs if e["event"] == "db_clean_dependants_deleted"]
    assert batches == ([3, 1] if engine.dialect.name == "postgresql" else [4])
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ti)
                            .where(ti.c.dag_id == "waits")).scalar_one() == 0


@pytest.mark.parametrize("archived", [True, False], ids=["archived", "not-archived"])
def test_a_dependant_row_added_behind_the_batches_is_found_by_the_last_pass(
        one_db: tuple[str, Engine, Data], monkeypatch: pytest.MonkeyPatch,
        archived: bool) -> None:
    """Batches go forward by root key; a task instance added under dag run 1001 once they have
    moved on to 1002 is behind them. Where the dependant goes to an archive, the last pass
    finds it, going over the chunk's roots again in windows (a transaction each, so none walks
    the whole chunk), and archives it. Where it does not, there is no last pass: the row is
    left to the dag run's own DELETE, whose cascade takes it."""
    from workers.dbclean import cascade
    from workers.dbclean import statements as sql

    _, engine, _ = one_db
    md = MetaData()
    md.reflect(engine, only=["dag_run", "task_instance"])
    ti, dr = md.tables["task_instance"], md.tables["dag_run"]
    with engine.begin() as conn:
        old_dag_runs(conn, md, "behind", {1001: 3, 1002: 3})
        archives = {"task_instance": sql.create_archive(
            conn, ti, f"{ARCHIVE_PREFIX}task_instance__behind")} if archived else {}
    with engine.connect() as conn:
        t = sql.reflect(conn, "dag_run")
        deps = [d for d in dbclean._dependants(conn, cascade.ForeignKeys(conn), t)
                if d[1].name == "task_instance" and len(d[0]) == 1]
    # Each batch begins with its search: on MySQL/MariaDB find_batch, in a transaction before
    # the batch's own (which a batch that found nothing never opens); on PostgreSQL the search
    # is the batch's one statement. calls: (window, rows found, the last root key found).
    searches = "find_batch" if sql.is_mysql(engine) else "delete_batch_from"
    calls: list[tuple[Any, int, Any]] = []
    real = getattr(cascade, searches)

    def batch(*args: Any, **kwargs: Any) -> Any:
        if len(calls) == 2:
            # The batches have moved past 1001, and the last one has committed (this one has
            # locked nothing yet: MariaDB's insert would wait for the batch's locks).
            assert calls[-1][2] == (1002,)
            with engine.begin() as conn:
                conn.execute(ti.insert().values(
                    id=uuid.uuid4(), dag_id="behind", run_id="r1001", task_id="late",
                    try_number=1, pool="p", pool_slots=1))
        result = real(*args, **kwargs)
        found, last = ((len(result), result[-1][-1:] if result else None)
                       if searches == "find_batch" else result)
        calls.append(((kwargs["after"], kwargs["until"]), found, last))
        return result

    monkeypatch.setattr(cascade, searches, batch)
    # Batches start at a twentieth of the batch size: 3, one dag run's task instances.
    request = dbclean.Request(before=T, tables=("dag_run",), batch_size=60,
                              skip_archive=not archived)
    sizes = dbclean.Sizes(batch_size=60, target_ms=10_000)
    assert dbclean._delete_dependants(engine, request, deps, t, [t.c.id.in_([1001, 1002])],
                                      sizes, archives) == (7 if archived else 6)
    # Forward: from the start, then from 1001 (>=: its own rows are done), from 1002 (empty).
    forward = [((None, None), 3), (((1001,), None), 3), (((1002,), None), 0)]
    # Then the last pass, up to 1002, where the forward batches ended (past it the forward
    # pass's last batch, after every other, found none): it finds the late one under 1001,
    # then nothing from 1001 on.
    last_pass = [((None, (1002,)), 1), (((1001,), (1002,)), 0)]
    assert [(window, rows) for window, rows, _ in calls] == \
        forward + (last_pass if archived else [])
    with engine.begin() as conn:
        left = select(func.count()).select_from(ti).where(ti.c.dag_id == "behind")
        assert conn.execute(left).scalar_one() == (0 if archived else 1)
        if archived:
            assert conn.execute(select(func.count()).select_from(
                archives["task_instance"])).scalar_one() == 7
        conn.execute(dr.delete().where(dr.c.id.in_([1001, 1002])))
        assert conn.execute(left).scalar_one() == 0


def test_a_task_instance_chunk_takes_its_reschedules_with_its_slices_unless_archived(
        one_db: tuple[str, Engine, Data]) -> None:
    """A task instance's cascade is bounded, so its reschedules go with each slice's DELETE
    (the foreign key's cascade), with no batch of them first (Airflow 3.3); Airflow 3.4 archives
    them with the task instance, so there a batch moves them into their archive first."""
    from structlog.testing import capture_logs

    _, engine, data = one_db
    md = MetaData()
    md.reflect(engine, only=["task_reschedule"])
    tr = md.tables["task_reschedule"]
    old = {r["id"] for r in data.tis if r["start_date"] is not None and r["start_date"] < T}
    with engine.begin() as conn:
        # Newer than T: their own rule keeps them; only their task instance's delete takes them.
        insert(conn, tr, [{"ti_id": ti_id, "start_date": T + DAY, "end_date": T + DAY,
                           "duration": 1, "reschedule_date": T + 2 * DAY} for ti_id in old])
    request = dbclean.Request(before=T, tables=("task_instance",), batch_size=10)
    with capture_logs() as logs:
        dbclean.clean(engine, request)
    batched = {e["dependant"] for e in logs if e["event"] == "db_clean_dependants_deleted"
               and e["table"] == "task_instance"}
    archives_them = data.version.startswith("3.4")
    assert batched == ({"task_reschedule"} if archives_them else set())
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(tr)).scalar_one() == 0
        archive = [a for a in archives(engine) if a.startswith(f"{ARCHIVE_PREFIX}task_reschedule")]
        assert len(archive) == (1 if archives_them else 0)
        for name in archive:
            assert conn.execute(select(func.count()).select_from(
                Table(name, MetaData(), autoload_with=conn))).scalar_one() == len(old)


def test_mariadb_moves_locked_keys_in_bounded_lists(mariadb_33: Engine) -> None:
    """MySQL/MariaDB archive and delete locked rows by their keys in bounded lists (MariaDB
    plans a long row-constructor list in more than linear time, and turns 1,000 values or
    more into a subquery): 2,500 log ids are three statements of each kind (999, 999, 502),
    and every row is archived once and deleted; 250 xcom keys (four columns) would be three of
    100. (PostgreSQL moves by range.)"""
    from workers.dbclean import statements as sql

    engine = mariadb_33
    md = MetaData()
    md.reflect(engine, only=["log", "xcom"])
    log_t = md.tables["log"]
    xcom_cols = sql.key_columns(md.tables["xcom"])
    assert len(xcom_cols) == 4
    assert len(sql.keys_in(xcom_cols, [(1, "t", -1, f"k{i}") for i in range(250)])) == 3
    with engine.begin() as conn:
        insert(conn, log_t, [{"id": 10_000 + i, "dttm": T - DAY, "event": "old"}
                             for i in range(2500)])
        archive = sql.create_archive(conn, log_t, f"{ARCHIVE_PREFIX}log__pieces")
    cols = sql.key_columns(log_t)
    with engine.begin() as conn:
        keys = [tuple(r) for r in conn.execute(
            select(*cols).where(log_t.c.id >= 10_000).with_for_update())]
        assert [len(c.right.value) for c in sql.keys_in(cols, keys)] == [999, 999, 502]
        assert sql.move_keys(conn, log_t, archive, keys) == 2500
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(log_t)
                            .where(log_t.c.id >= 10_000)).scalar_one() == 0
        assert sorted(conn.execute(select(archive.c.id)).scalars()) == \
            [10_000 + i for i in range(2500)]


def test_mariadb_checks_a_batchs_roots_against_the_rule_once(mariadb_33: Engine) -> None:
    """On MySQL/MariaDB a dependant batch reads its parents' rule (dag_run's keep-last: a GROUP
    BY over dag_run) twice, in its search and once on the roots it found, however many key
    lists lock its rows: 1,200 task instances (two lists) under two eligible dag runs go in
    one batch, and those of a dag run the rule keeps (started after T) stay."""
    from sqlalchemy import event

    from workers.dbclean import cascade
    from workers.dbclean import statements as sql
    from workers.dbclean.rules import RULES

    engine = mariadb_33
    md = MetaData()
    md.reflect(engine, only=["dag_run", "task_instance"])
    dr, ti = md.tables["dag_run"], md.tables["task_instance"]
    with engine.begin() as conn:
        old_dag_runs(conn, md, "roots", {1001: 600, 1002: 600, 1003: 5})
        conn.execute(dr.update().where(dr.c.id == 1003).values(start_date=T + DAY))
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with engine.begin() as conn:
        t = sql.reflect(conn, "dag_run")
        [(path, _, tables)] = [d for d in dbclean._dependants(conn, cascade.ForeignKeys(conn), t)
                               if d[1].name == "task_instance" and len(d[0]) == 1]
        rule = sql.eligible(conn, RULES["3.3"]["dag_run"], t, T)
        statements.clear()
        rows, last = cascade.delete_batch_from(conn, tables, path, [*rule, *sql.in_range(
            t, None, (1003,))], 2000)
    assert (rows, last) == (1200, (1002,))
    locking = [s for s in statements if s.startswith("SELECT") and "FOR UPDATE" in s]
    assert len(locking) == 2, statements
    assert sum("keep_last" in s for s in statements) == 2, statements
    with engine.connect() as conn:
        left = conn.execute(select(ti.c.run_id, func.count()).where(ti.c.dag_id == "roots")
                            .group_by(ti.c.run_id)).all()
    assert left == [("r1003", 5)]


def test_mariadb_searches_a_batch_before_the_transaction_that_locks_it(
        mariadb_33: Engine) -> None:
    """On MySQL/MariaDB a dependant batch's search (the join down from the chunk, unlocked)
    runs in a transaction of its own before the batch's: the transaction that locks and
    deletes the rows holds its locks for the rule's check, the locks and the move alone."""
    from sqlalchemy import event

    from workers.dbclean import cascade
    from workers.dbclean import statements as sql
    from workers.dbclean.rules import RULES

    engine = mariadb_33
    md = MetaData()
    md.reflect(engine, only=["dag_run", "task_instance"])
    ti = md.tables["task_instance"]
    with engine.begin() as conn:
        old_dag_runs(conn, md, "ahead", {1001: 30, 1002: 30})
        t = sql.reflect(conn, "dag_run")
        deps = [d for d in dbclean._dependants(conn, cascade.ForeignKeys(conn), t)
                if d[1].name == "task_instance" and len(d[0]) == 1]
        rule = sql.eligible(conn, RULES["3.3"]["dag_run"], t, T)
    seen: list[tuple[str, str]] = []

    def begin(_: Any) -> None:
        seen.append(("begin", ""))

    def commit(_: Any) -> None:
        seen.append(("commit", ""))

    def statement(*a: Any) -> None:
        seen.append(("sql", a[2]))

    for name, fn in (("begin", begin), ("commit", commit), ("before_cursor_execute", statement)):
        event.listen(engine, name, fn)
    try:
        request = dbclean.Request(before=T, tables=("dag_run",), batch_size=400,
                                  skip_archive=True)
        assert dbclean._delete_dependants(
            engine, request, deps, t, [*rule, t.c.id.in_([1001, 1002])],
            dbclean.Sizes(batch_size=400, target_ms=10_000)) == 60
    finally:
        for name, fn in (("begin", begin), ("commit", commit),
                         ("before_cursor_execute", statement)):
            event.remove(engine, name, fn)
    transactions: list[list[str]] = []
    for kind, text in seen:
        if kind == "begin":
            transactions.append([])
        elif kind == "sql" and transactions:
            transactions[-1].append(text)

    def is_search(s: str) -> bool:
        return " JOIN " in s and "FOR UPDATE" not in s

    locking = [tx for tx in transactions if any("FOR UPDATE" in s for s in tx)]
    searches = [tx for tx in transactions if any(is_search(s) for s in tx)]
    assert locking and searches, transactions
    assert not any(is_search(s) for tx in locking for s in tx), locking
    assert all(not any(s.lstrip().upper().startswith(("DELETE", "INSERT")) or "FOR UPDATE" in s
                       for s in tx) for tx in searches), searches
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ti)
                            .where(ti.c.dag_id == "ahead")).scalar_one() == 0


def test_mariadb_reads_a_composite_key_chunk_by_range(mariadb_33: Engine) -> None:
    """A chunk of xcom (a four-column key) is ``lo < key <= hi``, a row comparison MariaDB's
    range optimizer does not read; the bounds on the key's first column that in_range adds
    make the plan a range of the primary key, not a scan of the table per statement."""
    from sqlalchemy import text

    from workers.dbclean import statements as sql

    xcom = Table("xcom", MetaData(), autoload_with=mariadb_33)
    query = select(*sql.key_columns(xcom)).where(
        *sql.in_range(xcom, (10, "t", -1, "a"), (20, "t", -1, "a")))
    with mariadb_33.connect() as conn:
        sql_text = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
        [plan] = conn.execute(text("EXPLAIN " + sql_text)).mappings().all()
    assert (plan["type"], plan["key"]) == ("range", "PRIMARY"), plan


def test_mariadb_archives_a_chunk_by_its_range_only_under_repeatable_read(
        mariadb_33: Engine) -> None:
    """MySQL/MariaDB archive and delete a chunk whose rule reads only its own row (log) by its
    range and rule again, after locking its rows: under REPEATABLE READ the locking read
    locked the range's rows and gaps, so the range selects the locked rows again. Under READ
    COMMITTED (no gap locks: a row can appear in the range) they go by their keys."""
    from sqlalchemy import event

    from workers.dbclean import statements as sql

    md = MetaData()
    md.reflect(mariadb_33, only=["log"])
    log_t = md.tables["log"]
    deletes: list[str] = []
    event.listen(mariadb_33, "before_cursor_execute",
                 lambda *a: deletes.append(a[2]) if a[2].startswith("DELETE") else None)
    for level, first in (("READ COMMITTED", 20_000), ("REPEATABLE READ", 30_000)):
        engine = mariadb_33.execution_options(isolation_level=level)
        with engine.begin() as conn:
            insert(conn, log_t, [{"id": first + i, "dttm": T - DAY, "event": "old"}
                                 for i in range(5)])
            archive = sql.create_archive(conn, log_t, f"{ARCHIVE_PREFIX}log__{first}")
        deletes.clear()
        with engine.begin() as conn:
            assert conn.get_isolation_level() == level
            assert sql.move_chunk(conn, log_t, archive, [log_t.c.dttm < T], (first - 1,),
                                  (first + 4,)) == 5
            assert conn.execute(select(func.count()).select_from(archive)).scalar_one() == 5
        [statement] = deletes
        assert (" IN " in statement) == (level == "READ COMMITTED"), statement


def test_which_rules_mysql_can_delete_by_range(mariadb_33: Engine) -> None:
    """MySQL refuses a DELETE whose subquery reads its own table: the keep-last rules (dag_run,
    dag_version) go by locked keys even with --skip-archive, and a whole run of them works.
    A chunk goes by its range with an archive only where the rule reads the row alone: not
    task_state_store (its dag run's state), callback (its deadlines) or the keep-last ones."""
    from workers.dbclean import rules
    from workers.dbclean import statements as sql

    engine = mariadb_33
    reads_itself, reads_others = set(), set()
    with engine.connect() as conn:
        for rule in rules.effective_tables("3.3"):
            if not inspect(conn).has_table(rule.table):
                continue
            t = sql.reflect(conn, rule.table)
            where = sql.eligible(conn, rule, t, T)
            if sql._reads_itself(t, where):
                reads_itself.add(rule.table)
            if not sql._reads_only_itself(t, where):
                reads_others.add(rule.table)
    assert reads_itself == {"dag_run", "dag_version"}
    assert {"task_state_store", "callback", "dag_run", "dag_version"} <= reads_others
    assert not {"log", "job", "xcom", "task_instance"} & reads_others
    populate(engine, "3.3.2")
    report = dbclean.clean(engine, dbclean.Request(
        before=T, tables=("dag_run",), batch_size=5, skip_archive=True))
    assert [r.deleted for r in report.tables if r.table == "dag_run"][0] > 0


def test_state_of_a_running_dag_run_is_kept_unless_protection_is_off(
        one_db: tuple[str, Engine, Data]) -> None:
    """statesweep's protected-live-work rule holds in db-clean: task_state_store rows of a dag
    run that is running stay, expired or not; STATESWEEP_PROTECT_UNFINISHED_DAG_RUNS=false gives
    Airflow's exact rule."""
    url, engine, data = one_db
    md = MetaData()
    md.reflect(engine, only=["dag_run"])
    dr = md.tables["dag_run"]
    running = next(r for r in data.dag_runs if (r["dag_id"], r["run_id"]) == ("beta", "r5"))
    with engine.begin() as conn:
        conn.execute(dr.update().where(dr.c.id == running["id"]).values(state="running"))
    protected = {r["id"] for r in data.state if r["dag_run_id"] == running["id"]
                 and r["expires_at"] is not None and r["expires_at"] < T}
    assert protected
    args = ("--clean-before-timestamp", T.isoformat(), "--tables", "task_state_store", "-y",
            "--local")
    assert invoke(url, *args).exit_code == 0
    want = {r["id"] for r in data.state if r["expires_at"] is None or r["expires_at"] >= T}
    assert keys(engine, "task_state_store") == want | protected
    env = {"STATESWEEP_DATABASE_URL": url, "STATESWEEP_RUN_STORE_URL": "memory://",
           "STATESWEEP_PROTECT_UNFINISHED_DAG_RUNS": "false"}
    result = CliRunner().invoke(cli, ["db-clean", *args], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert keys(engine, "task_state_store") == want


def test_a_database_that_is_not_airflows_is_one_line_exit_4(pg_url: str) -> None:
    result = invoke(pg_url, "--clean-before-timestamp", T.isoformat(), "--dry-run")
    assert result.exit_code == 4, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "task_state_store" in lines[0], result.output


def test_without_local_a_run_store_the_workers_cannot_share_is_refused(
        one_db: tuple[str, Engine, Data]) -> None:
    """Without --local the run goes to the workers (tests/acceptance/test_db_clean_workers.py):
    with the run store in memory:// (this process only) it cannot, and says so in one line
    before anything is sent or deleted."""
    url, engine, _ = one_db
    before = snapshot(engine)
    result = invoke(url, "--clean-before-timestamp", T.isoformat(), "-y")
    assert result.exit_code != 0, result.output
    assert "memory://" in result.output and len(result.output.strip().splitlines()) == 1
    assert snapshot(engine) == before


def test_a_chunk_that_waits_too_long_for_a_lock_is_retried_and_finishes(
        one_db: tuple[str, Engine, Data]) -> None:
    """A writer holds a lock on an old log row until a chunk has given up waiting for it; each
    chunk's lock wait is bounded, so the chunk rolls back and is tried again, and finishes once
    the writer is done. (The writer lets go on the retry's log line, not after a fixed time: a
    slow machine must not let the run reach the row only after the lock is gone.)"""
    import threading

    from structlog.testing import capture_logs

    _, engine, data = one_db
    md = MetaData()
    md.reflect(engine, only=["log"])
    lg = md.tables["log"]
    old = min(r["id"] for r in data.logs if r["dttm"] < T)
    held = threading.Event()
    request = dbclean.Request(before=T, tables=("log",), batch_size=100, skip_archive=True,
                              lock_timeout_ms=300, statement_timeout_ms=10000)
    with capture_logs() as logs:
        def retried() -> bool:
            return any(e["event"] == "db_clean_retry" for e in list(logs))

        def writer() -> None:
            with engine.begin() as conn:
                conn.execute(select(lg.c.id).where(lg.c.id == old).with_for_update())
                held.set()
                deadline = time.monotonic() + 120
                while not retried() and time.monotonic() < deadline:
                    time.sleep(0.05)

        thread = threading.Thread(target=writer)
        thread.start()
        assert held.wait(10)
        dbclean.clean(engine, request)
        thread.join()
        assert retried()
    assert keys(engine, "log") == expected(data)["log"]


def test_excluding_dag_ids_keeps_rows_without_a_dag_id_eligible(
        one_db: tuple[str, Engine, Data]) -> None:
    """As Airflow: --exclude-dag-ids spares the named dags' rows, and a row with no dag id (a
    job no dag ran) belongs to no excluded dag, so it goes."""
    url, engine, data = one_db
    result = invoke(url, "--clean-before-timestamp", T.isoformat(), "--exclude-dag-ids",
                    "alpha,beta", "--tables", "job", "-y", "--local")
    assert result.exit_code == 0, result.output
    gone = {r["id"] for r in data.jobs if r["latest_heartbeat"] < T
            and r["dag_id"] not in ("alpha", "beta")}
    assert any(r["dag_id"] is None for r in data.jobs if r["id"] in gone)
    assert keys(engine, "job") == {r["id"] for r in data.jobs} - gone
