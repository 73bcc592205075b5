"""One statesweep deployment under test: a seeded database, the worker environment, a client
that sends tasks by name as beat and the CLI do, and the row counts a scenario reports."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from sqlalchemy import Engine, func, or_, select

from workers.celery_app import COORDINATE, DELETE_CHUNK, build_app
from workers.db import db_now, make_engine
from workers.runs import RunRecord, RunRegistry, registry_for
from workers.schema import Tables, build_tables, upgrade
from workers.seed import SeedSpec, expected_survivors, seed, task_state_rows
from workers.settings import Settings


def pipeline_env(database_url: str, redis_url: str, isolation: dict[str, str],
                 **overrides: object) -> dict[str, str]:
    """STATESWEEP_* for workers and clients: JSON logs, this test's prefix and queues."""
    env = {
        "STATESWEEP_DATABASE_URL": database_url,
        "STATESWEEP_BROKER_URL": redis_url,
        "STATESWEEP_RESULT_BACKEND": redis_url,
        "STATESWEEP_LOG_FORMAT": "json",
        **isolation,
    }
    env.update({f"STATESWEEP_{k.upper()}": str(v) for k, v in overrides.items()})
    return env


def seed_database(url: str, spec: SeedSpec, naming: str = "seed") -> tuple[Engine, Tables]:
    engine = make_engine(url)
    upgrade(engine, naming)
    tables = build_tables(naming)
    with engine.connect() as conn:
        now = db_now(conn)
    seed(engine, tables, spec, now)
    return engine, tables


@contextmanager
def client(settings: Settings) -> Iterator[Celery]:
    """A Celery app that sends tasks by name, as beat and the CLI do; it runs none."""
    app = build_app(settings, include_tasks=False)
    try:
        yield app
    finally:
        app.close()


@dataclass(frozen=True)
class Counts:
    expired: int
    live: int


def counts(engine: Engine, tables: Tables) -> Counts:
    """Rows expired by the database clock now, and rows live (future or never expiring)."""
    t = tables.task_state
    now = func.now() if engine.dialect.name == "postgresql" else dt.datetime.now(dt.UTC)
    with engine.connect() as conn:
        expired = conn.execute(
            select(func.count()).select_from(t).where(t.c.expires_at < now)).scalar_one()
        live = conn.execute(select(func.count()).select_from(t).where(
            or_(t.c.expires_at.is_(None), t.c.expires_at >= now))).scalar_one()
    return Counts(int(expired), int(live))


@dataclass
class Pipeline:
    env: dict[str, str]
    engine: Engine
    tables: Tables
    spec: SeedSpec
    log_dir: Path
    settings: Settings = field(init=False)

    def __post_init__(self) -> None:
        self.settings = Settings.from_env(self.env)

    @property
    def registry(self) -> RunRegistry:
        return registry_for(self.settings.effective_run_store_url, self.settings.key_prefix)

    def client(self) -> AbstractContextManager[Celery]:
        return client(self.settings)

    def trigger(self, app: Celery, **kwargs: Any) -> AsyncResult[Any]:
        """Send the coordinator as beat or an ad-hoc caller does: by name, to the control queue."""
        kwargs.setdefault("source", "adhoc")
        return app.send_task(COORDINATE, kwargs=kwargs, queue=self.settings.control_queue)

    def send_chunk(self, app: Celery, **kwargs: Any) -> AsyncResult[Any]:
        return app.send_task(DELETE_CHUNK, kwargs=kwargs, queue=self.settings.chunk_queue)

    def counts(self) -> Counts:
        return counts(self.engine, self.tables)

    def rows(self) -> set[tuple[int, str]]:
        return task_state_rows(self.engine, self.tables)

    def survivors(self) -> set[tuple[int, str]]:
        return expected_survivors(self.spec)

    def wait_for_state(self, run_id: str, states: tuple[str, ...],
                       timeout: float = 60) -> RunRecord:
        deadline = time.monotonic() + timeout
        record = None
        while time.monotonic() < deadline:
            record = self.registry.get(run_id)
            if record is not None and record.state in states:
                return record
            time.sleep(0.05)
        raise TimeoutError(f"run {run_id} not in {states} within {timeout}s: {record}")

    def wait_for_run_id(self, timeout: float = 30) -> str:
        """The id of the run the coordinator started (the newest in the run store)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recent = self.registry.recent(1)
            if recent:
                return recent[0].run_id
            time.sleep(0.05)
        raise TimeoutError(f"no run recorded within {timeout}s")

    def wait_until_idle(self, timeout: float = 60) -> None:
        """Until no run holds the single-flight lock."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.registry.active_run() is None:
                return
            time.sleep(0.1)
        raise TimeoutError(f"lock still held by {self.registry.active_run()} after {timeout}s")

    def worker_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))
