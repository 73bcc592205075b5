"""`statesweep db-clean` on real workers: the same rows left and archived as `--local` on the same
data (PostgreSQL and MariaDB, with and without --skip-archive); status, pause and abort of a
db-clean run; bad input refused before anything is sent.

Each test has its own databases (real Airflow schemas), Redis key prefix and queues, and its own
worker subprocess.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, MetaData, Table, inspect, select

from tests.airflow_schemas import airflow_schema_database
from tests.cli_runner import invoke, restore_logging  # noqa: F401 - an autouse fixture
from tests.integration.test_db_clean import (
    BAD_INPUT,
    TABLES,
    T,
    expected,
    insert,
    populate,
    snapshot,
)
from tests.processes import workers
from tests.services import REDIS_URL
from workers.db import make_engine
from workers.dbclean.rules import ARCHIVE_PREFIX
from workers.exit_codes import EXIT_BAD_ARGUMENT

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(600)]


def same_populate(*engines: Engine, version: str) -> Any:
    """The same rows in each database (populate's UUIDs drawn from one seeded generator)."""
    data = None
    for engine in engines:
        draw = random.Random(24).getrandbits
        real = uuid.uuid4
        uuid.uuid4 = lambda draw=draw: uuid.UUID(int=draw(128), version=4)  # type: ignore[assignment,misc]
        try:
            data = populate(engine, version)
        finally:
            uuid.uuid4 = real  # type: ignore[assignment]
    return data


def worker_env(url: str, isolation: dict[str, str], redis_url: str, **extra: str) -> dict[str, str]:
    return {"STATESWEEP_DATABASE_URL": url, "STATESWEEP_BROKER_URL": redis_url,
            "STATESWEEP_RESULT_BACKEND": redis_url, "STATESWEEP_RUN_STORE_URL": redis_url,
            "STATESWEEP_LOG_FORMAT": "json", "STATESWEEP_PUMP_INTERVAL_SECONDS": "1",
            **isolation, **{f"STATESWEEP_{k.upper()}": v for k, v in extra.items()}}


@pytest.fixture
def cleanup_keys(isolation: dict[str, str]) -> Iterator[None]:
    yield
    queues = [isolation["STATESWEEP_CONTROL_QUEUE"], isolation["STATESWEEP_CHUNK_QUEUE"]]
    with redis.Redis.from_url(REDIS_URL) as r:
        keys = list(r.scan_iter(match=f"{isolation['STATESWEEP_KEY_PREFIX']}:*"))
        keys += queues + [f"_kombu.binding.{q}" for q in queues]
        r.delete(*keys)


def archived(engine: Engine) -> dict[str, list[Any]]:
    """Each archive's source table -> the primary keys it holds (duplicates kept)."""
    out: dict[str, list[Any]] = {}
    with engine.connect() as conn:
        for name in sorted(n for n in inspect(conn).get_table_names()
                           if n.startswith(ARCHIVE_PREFIX)):
            source = name[len(ARCHIVE_PREFIX):].rsplit("__", 1)[0]
            t = Table(name, MetaData(), autoload_with=conn)
            live = Table(source, MetaData(), autoload_with=conn)
            pk = [c.name for c in live.primary_key.columns]
            rows = conn.execute(select(*[t.c[c] for c in pk])).all()
            out[source] = sorted(str(tuple(r)) for r in rows)
    return out


@contextmanager
def two_databases(dialect: str, version: str) -> Iterator[tuple[str, str]]:
    with airflow_schema_database(dialect, version) as a, \
            airflow_schema_database(dialect, version) as b:
        yield a, b


@pytest.mark.parametrize("skip_archive", [False, True], ids=["archive", "skip-archive"])
@pytest.mark.parametrize(("dialect", "version"), [("postgresql", "3.3.2"), ("mysql", "3.4.0b2")],
                         ids=["postgresql-3.3.2", "mysql-3.4.0b2"])
def test_the_workers_leave_and_archive_what_local_does(
        dialect: str, version: str, skip_archive: bool, isolation: dict[str, str],
        redis_url: str, tmp_path: Path, cleanup_keys: None) -> None:
    with two_databases(dialect, version) as (local_url, dist_url):
        local, dist = make_engine(local_url), make_engine(dist_url)
        try:
            data = same_populate(local, dist, version=version)
            args = ["db-clean", "--clean-before-timestamp", T.isoformat(), "--batch-size", "3",
                    "-y", *(["--skip-archive"] if skip_archive else [])]
            res = invoke(*args, "--local", env={"STATESWEEP_DATABASE_URL": local_url,
                                                "STATESWEEP_RUN_STORE_URL": "memory://"})
            assert res.exit_code == 0, res.output
            env = worker_env(dist_url, isolation, redis_url, max_chunks_in_flight="4")
            with workers(env, tmp_path, count=1, concurrency=2):
                out = invoke(*args, env=env)
            assert out.exit_code == 0, out.output
            assert snapshot(dist) == snapshot(local) == expected(data)
            assert archived(dist) == archived(local)
            if skip_archive:
                assert archived(dist) == {}
            else:
                assert set(archived(dist)) >= {"dag_run", "log", "job"}
            # The same per-table report as --local.
            lines = [ln for ln in out.stdout.splitlines() if ln.split(":")[0] in TABLES]
            assert lines and all(("deleted" in ln) or ("skipped" in ln) for ln in lines)
            assert "dag_run: deleted" in out.stdout
        finally:
            local.dispose()
            dist.dispose()


def _log_rows(engine: Engine, n: int) -> None:
    md = MetaData()
    md.reflect(engine, only=["log"])
    with engine.begin() as conn:
        insert(conn, md.tables["log"], [
            {"id": 1000 + i, "dttm": T - (i + 1) * dt.timedelta(seconds=1), "event": "e"}
            for i in range(n)])


def _registry(env: dict[str, str]) -> Any:
    from workers.runs import registry_for

    return registry_for(env["STATESWEEP_RUN_STORE_URL"], env["STATESWEEP_KEY_PREFIX"])


def _send(env: dict[str, str], name: str, **kwargs: Any) -> Any:
    from workers.celery_app import build_app
    from workers.settings import Settings

    app = build_app(Settings.from_env(env), include_tasks=False)
    try:
        return app.send_task(name, kwargs=kwargs, queue=env["STATESWEEP_CONTROL_QUEUE"])
    finally:
        app.close()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 240) -> Any:
    """Poll *check* until it returns something true (the run store, not a clock, decides)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_status_pause_and_abort_of_a_db_clean_run(
        isolation: dict[str, str], redis_url: str, tmp_path: Path, cleanup_keys: None) -> None:
    from workers.celery_app import DB_CLEAN, DB_CLEAN_PUMP
    from workers.dbclean.store import DbCleanStore

    with airflow_schema_database("postgresql", "3.3.2") as url:
        engine = make_engine(url)
        try:
            _log_rows(engine, 3000)
            env = worker_env(url, isolation, redis_url, max_chunks_in_flight="2")
            registry = _registry(env)
            store = DbCleanStore(registry)
            # Paused before it starts: the run is recorded, but no chunk is sent.
            assert invoke("pause", "--reason", "test", env=env).exit_code == 0
            run_id = "dbclean-status-1"
            with workers(env, tmp_path, count=1, concurrency=2):
                _send(env, DB_CLEAN, clean_before_timestamp=T.isoformat(), tables="log",
                      batch_size=10, run_id=run_id)
                record = wait_for("the run held", lambda: (r := registry.get(run_id)) and
                                  r.held.startswith("paused") and r)
                assert record.state == "running" and record.kind == "db_clean"
                assert record.chunks_done == 0 and store.window(run_id) == []
                out = invoke("status", run_id, "--format", "json", env=env)
                assert out.exit_code == 0, out.output
                assert '"kind": "db_clean"' in out.stdout and "paused" in out.stdout
                assert "log" in invoke("status", run_id, env=env).stdout
                overview = invoke("status", env=env)  # listed among the runs
                assert overview.exit_code == 0 and run_id in overview.stdout, overview.output
                # Resumed: resume itself pumps the db-clean run, and its chunks move.
                resumed = invoke("resume", "--format", "json", env=env)
                assert resumed.exit_code == 0, resumed.output
                assert '"pump_sent": true' in resumed.stdout and run_id in resumed.stdout
                wait_for("chunks moved", lambda: (r := registry.get(run_id)) and
                         r.chunks_done >= 3)
                # Aborted: the run ends, its lock is freed, the rest of the rows stay.
                out = invoke("abort", run_id, env=env)
                assert out.exit_code == 0, out.output
                _send(env, DB_CLEAN_PUMP, run_id=run_id)
                wait_for("the lock freed", lambda: store.active_run() is None)
                record = registry.get(run_id)
                assert record is not None and record.state == "aborted"
                # A new run may start and finish what the aborted one left.
                _send(env, DB_CLEAN, clean_before_timestamp=T.isoformat(), tables="log",
                      batch_size=500, run_id="dbclean-status-2")
                done = wait_for("the second run", lambda: (r := registry.get(
                    "dbclean-status-2")) and r.ended and r)
                assert done.state == "finished", done.error
            with engine.connect() as conn:
                log = Table("log", MetaData(), autoload_with=conn)
                assert conn.execute(select(log.c.id).where(log.c.dttm < T)).first() is None
            # The exporter's counters count each chunk once, as the runs' records do.
            from workers.metrics import read_counters

            counters = read_counters(registry.client, registry.prefix)
            runs = [registry.get(i) for i in (run_id, "dbclean-status-2")]
            assert sum(counters.db_clean_rows_deleted.values()) == \
                sum(r.rows_deleted for r in runs if r) > 0
            assert counters.db_clean_chunks_done == sum(r.chunks_done for r in runs if r)
            # Every key the runs made has a TTL (the window is gone once they ended).
            with redis.Redis.from_url(REDIS_URL) as r:
                mine = [k for k in r.scan_iter(match=f"{registry.prefix}:*")
                        if b":run:" in k or b":dbclean" in k]
                assert mine and all(r.ttl(k) > 0 for k in mine), \
                    [k for k in mine if r.ttl(k) <= 0]
                assert not [k for k in mine if k.endswith(b":dbclean:inflight")]
            tables = store.tables("dbclean-status-2")
            assert [t["table"] for t in tables] == ["log"]
            assert tables[0]["archive"].startswith(ARCHIVE_PREFIX + "log__")
        finally:
            engine.dispose()


@pytest.mark.parametrize(("args", "names"), [
    *BAD_INPUT,
    (("--clean-before-timestamp", T.isoformat(), "--dag-ids", ","), "--dag-ids"),
])
def test_bad_input_to_the_distributed_run_is_one_line_and_sends_nothing(
        args: tuple[str, ...], names: str, isolation: dict[str, str], redis_url: str,
        cleanup_keys: None) -> None:
    with airflow_schema_database("postgresql", "3.3.2") as url:
        engine = make_engine(url)
        try:
            _log_rows(engine, 10)
            env = worker_env(url, isolation, redis_url)
            out = invoke("db-clean", *args, "-y", env=env)
            assert out.exit_code == EXIT_BAD_ARGUMENT, out.output
            [line] = [ln for ln in out.stderr.splitlines() if ln.strip()]
            assert names in line
            with redis.Redis.from_url(REDIS_URL) as r:  # nothing recorded, nothing queued
                assert r.llen(isolation["STATESWEEP_CONTROL_QUEUE"]) == 0
                assert not list(r.scan_iter(match=f"{isolation['STATESWEEP_KEY_PREFIX']}:run:*"))
            with engine.connect() as conn:
                log = Table("log", MetaData(), autoload_with=conn)
                assert len(conn.execute(select(log.c.id)).all()) == 10
        finally:
            engine.dispose()


def test_a_failed_table_is_reported_and_the_next_table_runs_on_the_workers(
        isolation: dict[str, str], redis_url: str, tmp_path: Path, cleanup_keys: None) -> None:
    """As --local (tests/integration/test_db_clean.py): an old dag whose only version a task
    instance still references (ON DELETE RESTRICT refuses its cascade) fails its table, named
    in one error line, exit 1; log, cleaned after it, is cleaned all the same."""
    from tests.integration.test_db_clean import keys, pin_an_old_dags_version

    with airflow_schema_database("postgresql", "3.3.2") as url:
        engine = make_engine(url)
        try:
            data = populate(engine, "3.3.2")
            version_id = pin_an_old_dags_version(engine, data)
            env = worker_env(url, isolation, redis_url)
            with workers(env, tmp_path, count=1, concurrency=2):
                out = invoke("db-clean", "--clean-before-timestamp", T.isoformat(), "--tables",
                             "dag,log", "-y", env=env)
            assert out.exit_code == 1, out.output
            assert "Traceback" not in out.output
            errors = [ln for ln in out.output.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1 and "dag:" in errors[0], out.output
            assert "dag: FAILED" in out.output
            assert keys(engine, "dag") == {"old"} and keys(engine, "dag_version") == {version_id}
            assert keys(engine, "log") == expected(data)["log"]
        finally:
            engine.dispose()


def test_workers_cleaning_another_database_refuse_the_run(
        isolation: dict[str, str], redis_url: str, tmp_path: Path, cleanup_keys: None) -> None:
    """The command sends the identity of the database it read; workers that clean another one
    refuse the run (recorded as skipped, naming both) and delete nothing in either."""
    with two_databases("postgresql", "3.3.2") as (theirs, ours):
        their_engine, our_engine = make_engine(theirs), make_engine(ours)
        try:
            _log_rows(their_engine, 10)
            _log_rows(our_engine, 10)
            with workers(worker_env(theirs, isolation, redis_url), tmp_path, count=1):
                out = invoke("db-clean", "--clean-before-timestamp", T.isoformat(), "-y",
                             env=worker_env(ours, isolation, redis_url))
            assert out.exit_code != 0, out.output
            assert "skipped" in out.output and "database" in out.output
            for engine in (their_engine, our_engine):
                with engine.connect() as conn:
                    log = Table("log", MetaData(), autoload_with=conn)
                    assert len(conn.execute(select(log.c.id)).all()) == 10
                assert archived(engine) == {}
        finally:
            their_engine.dispose()
            our_engine.dispose()
