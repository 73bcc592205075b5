"""The planner crossover on MariaDB: ids against expiry, chunk by chunk in this process
(workers.chunk.run_local with a memory:// run store, as tests/integration/test_planners.py
drives it), so the comparison is the planners' SQL on InnoDB with no broker or worker in it.

Per expired fraction the table is seeded once (workers.seed) and kept as a plain copy; each
planner's run starts from that copy reloaded into task_state and ANALYZEd. CPU is the MariaDB
server process's (user + system, all its threads) over the run.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import psutil
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from bench import names
from bench.measure import progress
from tests.cleanup_runs import memory_store
from workers.chunk import run_local
from workers.db import db_now, make_engine
from workers.schema import build_tables, upgrade
from workers.seed import seed
from workers.settings import Settings

PLANNERS = ("ids", "expiry")
_COPY = "task_state_copy"
DATABASE = "statesweep_crossover"


def server_cpu_seconds() -> float:
    """CPU seconds of the local MariaDB server process; 0.0 if there is none."""
    for p in psutil.process_iter(["name"]):
        if p.info["name"] in ("mariadbd", "mysqld"):
            t = p.cpu_times()
            return float(t.user + t.system)
    return 0.0


def _fresh(admin_url: str, name: str) -> str:
    admin = make_engine(admin_url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
            conn.execute(text(f"CREATE DATABASE `{name}`"))
    finally:
        admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _reload(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM task_state"))
        conn.execute(text(f"INSERT INTO task_state SELECT * FROM {_COPY}"))  # noqa: S608
    with engine.connect() as conn:
        conn.execute(text("ANALYZE TABLE task_state")).all()


def run_planner(settings: Settings, engine: Engine, planner: str, batch: int) -> dict[str, Any]:
    tables = build_tables("seed")
    store = memory_store()
    cpu0, t0 = server_cpu_seconds(), time.perf_counter()
    summary = run_local(dataclasses.replace(settings, planner=planner), engine, tables, store,
                        batch_size=batch)
    wall, cpu = time.perf_counter() - t0, server_cpu_seconds() - cpu0
    record = store.get(summary.run_id)
    with engine.connect() as conn:
        left = conn.execute(text(
            "SELECT count(*) FROM task_state WHERE expires_at < :c"),
            {"c": summary.cutoff}).scalar_one()
    return {"database": "mariadb", "planner": planner, "wall_s": round(wall, 3),
            "db_cpu_s": round(cpu, 3), "rows": record.rows_deleted if record else None,
            "chunks": record.chunks_done if record else None, "expired_left": int(left),
            "state": record.state if record else None,
            "planner_reason": record.planner_reason if record else summary.reason}


def measure(admin_url: str, rows: int, fractions: list[float], batch: int,
            repeat: int = 1) -> list[dict[str, Any]]:
    """Every planner at every expired fraction (percent) on *rows* rows."""
    out: list[dict[str, Any]] = []
    try:
        for pct in fractions:
            url = _fresh(admin_url, DATABASE)
            settings = Settings.from_env({"STATESWEEP_DATABASE_URL": url,
                                          "STATESWEEP_RUN_STORE_URL": "memory://",
                                          "STATESWEEP_TABLE_NAMING": "seed",
                                          "STATESWEEP_CLEANUP_BATCH_SIZE": str(batch)})
            engine = make_engine(url)
            try:
                upgrade(engine, "seed")
                with engine.connect() as conn:
                    now = db_now(conn)
                t0 = time.perf_counter()
                seed(engine, build_tables("seed"), names.seed_spec(rows, pct), now)
                with engine.begin() as conn:
                    conn.execute(text(f"CREATE TABLE {_COPY} AS SELECT * FROM task_state"))  # noqa: S608
                progress(f"mariadb {pct:g}%: seeded {rows:,} rows in "
                         f"{time.perf_counter() - t0:.0f} s")
                for planner in [p for rep in range(repeat)
                                for p in (PLANNERS[::-1] if rep % 2 else PLANNERS)]:
                    _reload(engine)
                    row = {"expired_percent": pct,
                           **run_planner(settings, engine, planner, batch)}
                    progress(f"mariadb {pct:g}% {planner}: {row['rows']:,} rows in "
                             f"{row['wall_s']:.2f} s, server cpu {row['db_cpu_s']:.2f} s, "
                             f"left {row['expired_left']}")
                    out.append(row)
            finally:
                engine.dispose()
    finally:
        admin = make_engine(admin_url)
        with admin.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{DATABASE}`"))
        admin.dispose()
    return out
