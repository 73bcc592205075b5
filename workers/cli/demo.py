"""`statesweep demo`: the whole pipeline with no services at all.

A SQLite file, kombu's in-memory broker, an in-memory result backend and run store, and a
Celery worker running in a thread of this process. The coordinator is sent exactly as beat
sends it; the worker plans the run, consumes every chunk, then sweeps orphaned asset state.
At the end the database is checked against the seed: nothing expired is left, nothing live
was lost.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from workers.exceptions import StatesweepError
from workers.settings import METASTORE_BACKEND

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from workers.schema import Tables
    from workers.seed import SeedSpec

DEFAULT_DB = "statesweep-demo.db"
RESULT_TIMEOUT = 120.0


class DemoError(StatesweepError):
    """The demo could not run, or its check of the database failed."""


@dataclass(frozen=True)
class DemoResult:
    run: dict[str, Any]
    orphans: dict[str, Any]
    expired_left: int
    live_rows_lost: int
    orphaned_asset_state_left: int
    live_asset_state_lost: int

    @property
    def ok(self) -> bool:
        return not (self.expired_left or self.live_rows_lost or self.orphaned_asset_state_left
                    or self.live_asset_state_lost)


def demo_environment(db_path: Path) -> dict[str, str]:
    """The settings that make the demo need no server; everything else comes from the env."""
    return {
        "STATESWEEP_DATABASE_URL": f"sqlite:///{db_path}",
        "STATESWEEP_BROKER_URL": "memory://localhost/",
        "STATESWEEP_RESULT_BACKEND": "cache+memory://",
        "STATESWEEP_RUN_STORE_URL": "memory://",
        "STATESWEEP_TABLE_NAMING": "seed",
        "STATESWEEP_STATE_BACKEND": METASTORE_BACKEND,
    }


def _fresh_database(db_path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)


def run_demo(rows: int, db_path: Path) -> DemoResult:
    if "workers.celery_app" in sys.modules:
        # Its settings were read at import, before the demo could point them at memory://.
        raise DemoError("the demo needs a fresh process: workers.celery_app is already imported")
    db_path = db_path.resolve()
    _fresh_database(db_path)
    os.environ.update(demo_environment(db_path))

    from workers import seed
    from workers.db import db_now, make_engine
    from workers.schema import build_tables, upgrade
    from workers.settings import Settings

    settings = Settings.from_env()  # the demo's settings, checked before anything runs
    engine = make_engine(settings.database_url)
    try:
        upgrade(engine, "seed")
        tables = build_tables("seed")
        spec = seed.SeedSpec(rows=rows)
        with engine.connect() as conn:
            now = db_now(conn)
        t0 = time.perf_counter()
        counts = seed.seed(engine, tables, spec, now)
        click.echo(f"seeded {db_path}: {rows:,} task state rows ({counts.expired:,} expired, "
                   f"{counts.future:,} expiring later, {counts.never:,} never expiring) and "
                   f"{counts.asset_rows_live + counts.asset_rows_orphaned:,} asset state rows "
                   f"({counts.asset_rows_orphaned:,} orphaned) in "
                   f"{time.perf_counter() - t0:.1f}s", err=True)
        run, orphans = _run_pipeline()
        return _verify(engine, tables, spec, run, orphans)
    finally:
        engine.dispose()


def _run_pipeline() -> tuple[dict[str, Any], dict[str, Any]]:
    """Start an in-process worker, trigger both beat entries, follow the run to its end."""
    from celery.contrib.testing.worker import start_worker

    from beat_schedule import build_beat_schedule
    from workers import tasks  # noqa: F401 - registers the tasks on the app
    from workers.celery_app import app, settings
    from workers.cli.progress import ProgressBar, follow_run
    from workers.run_ids import new_run_id
    from workers.runs import registry_for

    # The in-memory transport polls; a short interval keeps the demo snappy.
    app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                         "polling_interval": 0.05}
    schedule = build_beat_schedule(settings)
    registry = registry_for(settings.effective_run_store_url, settings.key_prefix)
    _quiet_celery()
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING",
                      hostname="demo@localhost", shutdown_timeout=30,
                      queues=[settings.control_queue, settings.chunk_queue]):
        click.echo(f"worker demo@localhost consumes {settings.control_queue}, "
                   f"{settings.chunk_queue}; sending the coordinator as beat does", err=True)
        entry = schedule["statesweep-cleanup-task-state"]
        # Recorded as queued before it is sent, as `statesweep cleanup` does, so the bar
        # follows the run from the moment it is sent, planning included, not from the
        # coordinator's answer (which came when the run was all but done).
        run_id = new_run_id()
        registry.enqueue(run_id, entry["kwargs"]["source"])
        sent = app.send_task(entry["task"], kwargs={**entry["kwargs"], "run_id": run_id},
                             **entry["options"])
        record = follow_run(registry, run_id, ProgressBar("demo run"), settings=settings)
        summary = sent.get(timeout=RESULT_TIMEOUT)
        if summary.get("status") not in ("started", "finished"):
            raise DemoError(f"the coordinator did not start a run: {summary}")
        entry = schedule["statesweep-sweep-orphaned-asset-state"]
        orphans = app.send_task(entry["task"], kwargs=entry.get("kwargs", {}),
                                **entry["options"]).get(timeout=RESULT_TIMEOUT)
    return record.as_dict(), orphans


def _quiet_celery() -> None:
    # statesweep's own events tell the story; Celery's per-task lines would drown them.
    for name in ("celery", "kombu"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _verify(engine: Engine, tables: Tables, spec: SeedSpec, run: dict[str, Any],
            orphans: dict[str, Any]) -> DemoResult:
    import datetime as dt

    from workers import cleanup, seed

    cutoff = dt.datetime.fromisoformat(run["cutoff"])
    survivors = seed.task_state_rows(engine, tables)
    live = seed.expected_survivors(spec)
    assets = seed.asset_state_rows(engine, tables)
    live_assets = seed.expected_live_asset_state(spec)
    return DemoResult(
        run=run, orphans=orphans,
        expired_left=cleanup.count_expired(engine, tables, cutoff),
        live_rows_lost=len(live - survivors),
        orphaned_asset_state_left=len(assets - live_assets),
        live_asset_state_lost=len(live_assets - assets),
    )


def counted(n: int, singular: str, plural: str) -> str:
    """``1 batch``, ``3 batches``: the demo's lines read as sentences."""
    return f"{n:,} {singular if n == 1 else plural}"


def render(result: DemoResult) -> str:
    run = result.run
    return "\n".join([
        f"run {run['run_id']} {run['state']}: {run['rows_deleted']:,} expired rows deleted in "
        f"{counted(run['chunks_done'], 'chunk', 'chunks')}, {run['duration']:.2f}s "
        f"({run['rows_per_second']:,.0f} rows/s), cutoff {run['cutoff']}",
        f"orphaned asset state: {result.orphans.get('rows', 0):,} rows deleted in "
        f"{counted(result.orphans.get('batches', 0), 'batch', 'batches')}",
        f"expired left: {result.expired_left}, live rows lost: {result.live_rows_lost}",
        f"orphaned asset state left: {result.orphaned_asset_state_left}, "
        f"live asset state lost: {result.live_asset_state_lost}",
    ])


@click.command("demo")
@click.option("--rows", type=int, default=100_000, show_default=True,
              help="Task state rows to seed.")
@click.option("--db", "db_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path(DEFAULT_DB), show_default=True,
              help="SQLite file, recreated each time.")
@click.pass_context
def demo(ctx: click.Context, rows: int, db_path: Path) -> None:
    """The whole pipeline with no services: SQLite, an in-memory broker, an in-process worker."""
    from workers.exceptions import InvalidArgument
    from workers.exit_codes import EXIT_FAILURE
    from workers.logs import configure_logging

    if rows < 0:
        raise InvalidArgument(f"--rows must be 0 or a positive number of rows, got {rows}")
    configure_logging("console", "INFO", force=True)
    result = run_demo(rows, db_path)
    click.echo(render(result))
    if not result.ok:
        ctx.exit(EXIT_FAILURE)
