"""The Celery app: configuration, queues, routes, logging and per-process resources.

Settings are read when this module is imported, so a worker, beat or Flower with a bad setting
stops at start-up with the settings error, before it consumes or deletes anything.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from celery import Celery, signals

from workers.brokers import broker_config
from workers.exceptions import SettingsError
from workers.exit_codes import EXIT_SETTINGS
from workers.logs import configure_logging, quiet_routine_tasks
from workers.runs import RunRegistry, registry_for
from workers.settings import Settings, get_settings

if TYPE_CHECKING:  # the database is imported where it is used: the CLI sends tasks without it
    from sqlalchemy import Engine

    from workers.schema import Tables

COORDINATE = "statesweep.coordinate"
DELETE_CHUNK = "statesweep.delete_chunk"
SWEEP_ORPHANS = "statesweep.sweep_orphaned_asset_state"
PUMP = "statesweep.pump"
PAUSE = "statesweep.pause"
RESUME = "statesweep.resume"
ABORT = "statesweep.abort"
# db-clean on the workers (workers.dbclean.tasks): its coordinator, its chunks, its pump.
DB_CLEAN = "statesweep.db_clean"
DB_CLEAN_CHUNK = "statesweep.db_clean_chunk"
DB_CLEAN_PUMP = "statesweep.db_clean_pump"
CONTROL_TASKS = (COORDINATE, SWEEP_ORPHANS, PUMP, PAUSE, RESUME, ABORT, DB_CLEAN, DB_CLEAN_PUMP)
IDENTITY_COMMAND = "statesweep_identity"  # a remote control command each worker answers


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from statesweep's; also what the tests check."""
    from beat_schedule import build_beat_schedule

    return {
        **broker_config(settings),
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        # A task is acknowledged after it ran, so a worker killed mid-chunk loses nothing: the
        # broker redelivers the chunk and its DELETE (idempotent) runs again.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.chunk_soft_time_limit,
        "task_time_limit": settings.chunk_time_limit,
        "broker_connection_retry_on_startup": True,
        # A chunk running when the broker connection drops finishes its short transaction;
        # its redelivered copy then deletes nothing. Explicit, as Celery 6 changes the default.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_send_task_events": True,
        # Clients (CLI, Flower, beat) announce what they send; workers do not (worker_init
        # below): each chunk a finishing chunk sends would cost an extra publish, a third of
        # sending it, and Flower still sees every chunk received, started and done.
        "task_send_sent_event": True,
        "task_track_started": True,
        # Chunk tasks store no result (Flower follows them through events, progress lives in
        # the run store): a result write per chunk was a large share of a chunk's overhead.
        # Failures are still stored, so a failed chunk can be looked up by its task id.
        "task_store_errors_even_if_ignored": True,
        "result_extended": True,
        "result_expires": 7 * 24 * 3600,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        "worker_hijack_root_logger": False,
        # Broadcasts (inspect, ping, Flower's and doctor's questions to workers) go to this
        # deployment's workers only: the control exchange is named after the control queue, so
        # two deployments sharing a broker (or a vhost) never answer each other's inspect.
        "control_exchange": settings.control_queue,
        "task_default_exchange": settings.control_queue,
        "task_default_routing_key": settings.control_queue,
        "task_default_queue": settings.control_queue,
        "task_create_missing_queues": False,
        "task_routes": {
            **{name: {"queue": settings.control_queue} for name in CONTROL_TASKS},
            DELETE_CHUNK: {"queue": settings.chunk_queue},
            DB_CLEAN_CHUNK: {"queue": settings.chunk_queue},
        },
        "beat_schedule": build_beat_schedule(settings),
        # STATESWEEP_CHUNK_RATE_LIMIT is statesweep's own, shared by all workers (the run
        # store hands out start slots): Celery's rate_limit is per worker process and, with
        # prefork and Redis, fell to 1 chunk/s after a burst.
    }


def build_app(settings: Settings, *, include_tasks: bool = True) -> Celery:
    """A Celery app for *settings*. Clients (CLI, tests) send tasks by name with one whose
    tasks are not included, so they need no database."""
    new = Celery("statesweep",
                 include=["workers.tasks", "workers.dbclean.tasks"] if include_tasks else [])
    new.conf.update(celery_config(settings))
    return new


try:
    settings = get_settings()
except SettingsError as exc:
    # A worker, beat or Flower with a bad setting stops here with the variable named, before
    # it consumes or deletes anything; a traceback would bury the one line that matters.
    sys.stderr.write(f"statesweep: {exc}\n")
    raise SystemExit(EXIT_SETTINGS) from None
app = build_app(settings)


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    # Connecting here stops Celery from configuring the root logger itself.
    configure_logging(settings.log_format, settings.log_level)
    # The pump runs every few seconds, run or no run: its routine lines are noise at INFO.
    quiet_routine_tasks((PUMP,))


@signals.worker_init.connect
def _no_sent_events_from_workers(**_: Any) -> None:
    app.conf.task_send_sent_event = False


def _refuse_without_run_store(role: str) -> None:
    """A worker or beat without a run store it can share refuses to start: one line naming
    the setting and its value (masked), the exit code of the cause (workers.startup)."""
    from workers.startup import StartupRefused, check_run_store

    try:
        check_run_store(settings)
    except StartupRefused as exc:
        sys.stderr.write(f"statesweep: {role} not started: {exc}\n")
        raise SystemExit(exc.code) from None


@signals.worker_init.connect
def _check_run_store_at_start(**_: Any) -> None:
    _refuse_without_run_store("worker")


@signals.beat_init.connect
def _check_run_store_at_beat_start(**_: Any) -> None:
    _refuse_without_run_store("beat")


@signals.beat_init.connect
def _one_beat(**_: Any) -> None:
    """One beat per deployment (workers.beat_lock): beat starts ticking once this returns, and
    it returns once this beat holds the run store's beat lock; a second beat waits here as a
    standby, saying so once, and takes over when the first stops."""
    from workers.beat_lock import BeatLock, lost_lock_exit
    from workers.runs import registry_for

    lock = BeatLock(registry_for(settings.effective_run_store_url, settings.key_prefix))
    lock.wait_to_hold()
    lock.keep(on_lost=lost_lock_exit)


@signals.worker_init.connect
def _check_database_at_start(**_: Any) -> None:
    """A worker that cannot reach its database, find the state tables or delete from them (a
    read-only user) refuses to start, rather than report ready and fail every task it takes
    (compose's healthcheck then means something). One line, the database URL masked, the exit
    code of the cause."""
    from workers.db import get_engine
    from workers.exceptions import SchemaError
    from workers.exit_codes import EXIT_SCHEMA, EXIT_UNAVAILABLE
    from workers.identity import read_identity
    from workers.privileges import check_privileges
    from workers.schema import resolve_tables
    from workers.settings import mask_url

    engine = get_engine(settings.database_url)
    try:
        tables = resolve_tables(engine, settings.table_naming)
        # A read-only user would fail every chunk it takes: SELECT and DELETE, both tables.
        check_privileges(engine, [tables.task_state, tables.asset_state],
                         settings.database_origin)
        with engine.connect() as conn:
            worker_database.append(read_identity(conn, tables.naming).encode())
    except SchemaError as exc:  # PrivilegeError too: exit 4, the user and GRANT named
        sys.stderr.write(f"statesweep: worker not started: {exc}\n")
        raise SystemExit(EXIT_SCHEMA) from None
    except Exception as exc:  # the driver's own error; its message never holds the password
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        sys.stderr.write(f"statesweep: worker not started: database "
                         f"{mask_url(settings.database_url)} is unreachable: "
                         f"{type(exc).__name__}: {cause}\n")
        raise SystemExit(EXIT_UNAVAILABLE) from None
    finally:
        engine.dispose()


#: The database identity this worker cleans (workers.identity), read once at start; doctor asks
#: every worker for it (the statesweep_identity control command) and compares with its own.
worker_database: list[dict[str, str]] = []


@signals.worker_init.connect
def _answer_identity(**_: Any) -> None:
    from celery.worker.control import inspect_command

    @inspect_command(name=IDENTITY_COMMAND)
    def statesweep_identity(state: Any) -> dict[str, Any]:
        """The database this worker cleans, as its server names it."""
        return {"database": worker_database[-1] if worker_database else None}


@signals.worker_process_init.connect
def _after_fork(**_: Any) -> None:
    from workers.db import forget_engines_after_fork

    forget_engines_after_fork()
    resources.cache_clear()


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_name=getattr(task, "name", None), task_id=task_id)


@signals.task_postrun.connect
def _unbind_task(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()


@dataclass(frozen=True)
class Resources:
    settings: Settings
    engine: Engine
    tables: Tables
    registry: RunRegistry


@functools.cache
def resources() -> Resources:
    """This process's engine, resolved tables and run registry, built on first use."""
    from workers.db import get_engine
    from workers.schema import resolve_tables

    engine = get_engine(settings.database_url)
    tables = resolve_tables(engine, settings.table_naming)
    registry = registry_for(settings.effective_run_store_url, settings.key_prefix)
    return Resources(settings, engine, tables, registry)
