"""`statesweep exporter` with real parts: a real Prometheus scraping it every second while real
workers run a cleanup on PostgreSQL; and the exporter outliving its database and its Redis.

The numbers the first test prints (rows deleted per the database and per Prometheus) are the
ones the README's Monitoring section quotes.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, func, select, text

from tests.conftest import seed_postgres
from tests.processes import ROOT, child_env, wait_for_run, workers
from tests.prometheus import free_port, prometheus, value
from tests.reliability.faults import own_redis
from tests.services import PG_ADMIN_URL, REDIS_URL
from workers.celery_app import COORDINATE, SWEEP_ORPHANS, build_app
from workers.settings import Settings

pytestmark = pytest.mark.acceptance

T = TypeVar("T")


def wait_until(check: Callable[[], T | None], what: str, timeout: float = 60) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got is not None and got is not False:
            return got
        time.sleep(0.3)
    raise TimeoutError(f"{what} not seen in {timeout}s")


@contextmanager
def exporter(env: Mapping[str, str], log_dir: Path) -> Iterator[str]:
    """`statesweep exporter` as a subprocess on a free port; its /metrics URL."""
    exe = str(Path(sys.executable).with_name("statesweep"))
    port = free_port()
    log_path = log_dir / "exporter.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([exe, "exporter", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, env=child_env(env), stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_until(lambda: proc.poll() is not None or scrape(url) is not None,
                   "the exporter answering", timeout=30)
        assert proc.poll() is None, log_path.read_text()
        yield url
        assert proc.poll() is None, f"the exporter died:\n{log_path.read_text()}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def scrape(url: str) -> dict[str, float] | None:
    """Every sample of one scrape as {'name{labels}': value}; None if it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            body = r.read().decode()
    except OSError:
        return None
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def test_prometheus_counts_the_rows_the_database_lost(
        pg_url: str, isolation: dict[str, str], tmp_path: Path) -> None:
    db = seed_postgres(pg_url, isolation, rows=6_000)
    env = {**db.env, "STATESWEEP_CLEANUP_BATCH_SIZE": "250",
           "STATESWEEP_EXPORTER_CACHE_SECONDS": "1", "STATESWEEP_LOG_FORMAT": "json"}
    t, s = db.tables.task_state, db.tables.asset_state

    def count(table: object) -> int:
        with db.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

    tasks_before, assets_before = count(t), count(s)
    settings = Settings.from_env(env)
    client = build_app(settings, include_tasks=False)
    try:
        with exporter(env, tmp_path) as metrics_url, \
                prometheus(tmp_path, [metrics_url.split("/")[2]]) as prom:
            backlog = 'statesweep_backlog_expired_rows{table="task_state"}'
            assert wait_until(lambda: value(prom, backlog), "the backlog in Prometheus") == (
                db.counts.expired)
            assert value(prom, "statesweep_last_run_finish_timestamp_seconds") is None
            started = time.time()
            with workers(env, tmp_path, count=2):
                result = client.send_task(COORDINATE, kwargs={"source": "test"},
                                          queue=settings.control_queue)
                summary = result.get(timeout=120)
                record = wait_for_run(env, summary["run_id"])
                client.send_task(SWEEP_ORPHANS, queue=settings.control_queue).get(timeout=120)
                wait_until(lambda: value(prom, 'statesweep_workers{role="chunks"}'),
                           "workers consuming the chunk queue")
            deleted_tasks, deleted_assets = tasks_before - count(t), assets_before - count(s)
            assert record.state == "finished" and record.rows_deleted == deleted_tasks
            wait_until(lambda: value(prom, backlog) == 0, "the backlog falling to 0")
            rows = 'statesweep_rows_deleted_total{table="%s"}'
            prom_tasks = wait_until(lambda: value(prom, rows % "task_state"), "rows deleted")
            prom_assets = wait_until(lambda: value(prom, rows % "asset_state"), "orphans")
            finished = value(prom, "statesweep_last_run_finish_timestamp_seconds")
            chunks = value(prom, "statesweep_chunks_done_total")
            histogram = value(prom, "statesweep_chunk_duration_seconds_count")
            print(f"\nrows deleted: task_state database={deleted_tasks} prometheus={prom_tasks}; "
                  f"asset_state database={deleted_assets} prometheus={prom_assets}; "
                  f"chunks={chunks} (planned {record.chunks_planned})")
            assert (prom_tasks, prom_assets) == (deleted_tasks, deleted_assets)
            assert deleted_tasks == db.counts.expired
            assert deleted_assets == db.counts.asset_rows_orphaned
            assert chunks == histogram == record.chunks_planned
            assert finished is not None and finished >= started
            assert value(prom, 'statesweep_last_run_state{state="finished"}') == 1
            assert value(prom, 'statesweep_backlog_orphaned_rows{table="asset_state"}') == 0
            assert value(prom, 'min(statesweep_up)') == 1
    finally:
        client.close()
        db.engine.dispose()
        with redis.Redis.from_url(REDIS_URL) as r:
            keys = list(r.scan_iter(match=f"{isolation['STATESWEEP_KEY_PREFIX']}:*"))
            if keys:
                r.delete(*keys)


def test_exporter_outlives_its_database_and_redis(
        pg_url: str, isolation: dict[str, str], tmp_path: Path) -> None:
    db = seed_postgres(pg_url, isolation, rows=200)
    with own_redis(password="hunter2secret") as server:
        env = {**db.env, "STATESWEEP_BROKER_URL": server.url,
               "STATESWEEP_RESULT_BACKEND": server.url, "STATESWEEP_EXPORTER_CACHE_SECONDS": "0"}
        with exporter(env, tmp_path) as url:
            first = scrape(url)
            assert first is not None
            assert {p: first[f'statesweep_up{{part="{p}"}}']
                    for p in ("run_store", "database", "workers")} == {
                "run_store": 1, "database": 1, "workers": 1}
            assert first['statesweep_backlog_expired_rows{table="task_state"}'] == (
                db.counts.expired)

            server.stop()  # Redis: run store and broker gone
            down = wait_until(lambda: (m := scrape(url)) and m.get(
                'statesweep_up{part="run_store"}') == 0 and m, "run store reported down")
            assert down['statesweep_up{part="workers"}'] == 0
            assert down['statesweep_up{part="database"}'] == 1
            assert "statesweep_chunks_done_total" not in down  # no stale counters

            db.engine.dispose()
            admin = create_engine(PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://"),
                                  isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                name = pg_url.rsplit("/", 1)[1]
                conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            admin.dispose()
            gone = wait_until(lambda: (m := scrape(url)) and m.get(
                'statesweep_up{part="database"}') == 0 and m, "database reported down")
            assert not any(k.startswith("statesweep_backlog") for k in gone)
            assert scrape(url) is not None  # and it keeps serving
    log = (tmp_path / "exporter.log").read_text()
    failed = [line for line in log.splitlines() if "exporter_part_failed" in line]
    for part in ("run_store", "database", "workers"):
        assert any(f"part={part}" in line for line in failed), log
    assert "hunter2secret" not in log
