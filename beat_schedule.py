"""Celery beat's schedule for statesweep: the coordinator, the pump (the active run's heartbeat)
and the orphan sweep, each on its own period from settings (seconds, or a five-field crontab);
db-clean and its pump only when STATESWEEP_DB_CLEAN_KEEP_DAYS turns it on.

Each entry carries ``expires``: a beat that fires while no worker consumes (a backlog after an
outage) leaves messages that expire instead of piling up runs. The coordinator's single-flight
lock makes any that do run at once harmless; expiry keeps the queue from filling with them.
One beat schedules: a second waits as its standby on the run store's beat lock
(workers.beat_lock) and takes over when the first stops.

The coordinator entry carries beat's selection (STATESWEEP_DAG_IDS, STATESWEEP_EXCLUDE_DAG_IDS,
STATESWEEP_CLEAN_GRACE) as the coordinator task's own arguments. The grace travels as seconds,
not as a timestamp: each run takes it from the database's now() when it fixes its cutoff.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from workers.settings import Settings, get_settings, parse_schedule

COORDINATE = "statesweep.coordinate"
SWEEP_ORPHANS = "statesweep.sweep_orphaned_asset_state"
PUMP = "statesweep.pump"
DB_CLEAN = "statesweep.db_clean"
DB_CLEAN_PUMP = "statesweep.db_clean_pump"
CRONTAB_EXPIRES_SECONDS = 300.0


def _schedule(raw: str) -> tuple[float | crontab, float]:
    parsed = parse_schedule(raw)
    if isinstance(parsed, float):
        return parsed, parsed
    minute, hour, day_of_month, month_of_year, day_of_week = parsed
    return (crontab(minute=minute, hour=hour, day_of_month=day_of_month,
                    month_of_year=month_of_year, day_of_week=day_of_week),
            CRONTAB_EXPIRES_SECONDS)


def beat_selection(settings: Settings) -> dict[str, Any]:
    """The coordinator task's selection arguments for beat's runs; only those set."""
    out: dict[str, Any] = {}
    if settings.dag_id_list:
        out["dag_ids"] = settings.dag_id_list
    if settings.exclude_dag_id_list:
        out["exclude_dag_ids"] = settings.exclude_dag_id_list
    if settings.clean_grace:
        out["clean_grace_seconds"] = settings.clean_grace
    return out


def db_clean_entries(settings: Settings) -> dict[str, dict[str, Any]]:
    """Beat's db-clean (workers.dbclean), only with STATESWEEP_DB_CLEAN_KEEP_DAYS > 0: its run
    (rows older than the database's now() minus that many days, archived) and its pump, which
    resends chunks a dead worker held and sends chunks held by flow control once it lifts."""
    if not settings.db_clean_keep_days:
        return {}
    schedule, expires = _schedule(settings.db_clean_schedule)
    tables = [t for t in settings.db_clean_tables.split(",") if t]
    return {
        "statesweep-db-clean": {
            "task": DB_CLEAN,
            "schedule": schedule,
            "kwargs": {"source": "beat", "keep_days": settings.db_clean_keep_days,
                       **({"tables": tables} if tables else {})},
            "options": {"queue": settings.control_queue, "expires": expires},
        },
        "statesweep-db-clean-pump": {
            "task": DB_CLEAN_PUMP,
            "schedule": settings.pump_interval_seconds,
            "options": {"queue": settings.control_queue,
                        "expires": settings.pump_interval_seconds},
        },
    }


def build_beat_schedule(settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    settings = settings or get_settings()
    coord, coord_expires = _schedule(settings.coordinator_schedule)
    orphans, orphans_expires = _schedule(settings.orphan_schedule)
    return {
        **db_clean_entries(settings),
        "statesweep-cleanup-task-state": {
            "task": COORDINATE,
            "schedule": coord,
            "kwargs": {"source": "beat", **beat_selection(settings)},
            "options": {"queue": settings.control_queue, "expires": coord_expires},
        },
        # The active run's heartbeat: a window that nothing else tops up (a hold that lifted by
        # itself, a message lost) moves again within one interval. Without an active run the
        # pump returns at once; expiring it keeps a backlog from piling up.
        "statesweep-pump": {
            "task": PUMP,
            "schedule": settings.pump_interval_seconds,
            "options": {"queue": settings.control_queue,
                        "expires": settings.pump_interval_seconds},
        },
        "statesweep-sweep-orphaned-asset-state": {
            "task": SWEEP_ORPHANS,
            "schedule": orphans,
            "options": {"queue": settings.control_queue, "expires": orphans_expires},
        },
    }
