"""Celery beat's schedule and the Celery configuration derived from settings (no services)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from celery.schedules import crontab

from beat_schedule import CRONTAB_EXPIRES_SECONDS, build_beat_schedule
from workers.celery_app import (
    COORDINATE,
    DELETE_CHUNK,
    SWEEP_ORPHANS,
    build_app,
    celery_config,
)
from workers.settings import Settings

COORD_ENTRY = "statesweep-cleanup-task-state"
ORPHAN_ENTRY = "statesweep-sweep-orphaned-asset-state"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """Non-default values throughout, so a hard-coded default cannot pass for a derived one."""
    return make_settings(control_queue="q.ctl", chunk_queue="q.chunks",
                         chunk_soft_time_limit=50, chunk_time_limit=70, visibility_timeout=200,
                         coordinator_schedule="45", orphan_schedule="*/10 3 * * 1-5")


def test_beat_schedule_in_seconds(settings: Settings) -> None:
    entry = build_beat_schedule(settings)[COORD_ENTRY]
    assert entry["task"] == COORDINATE
    assert entry["schedule"] == 45.0
    assert entry["kwargs"] == {"source": "beat"}
    # Expiring after one period: a backlog of triggers never piles up runs.
    assert entry["options"] == {"queue": "q.ctl", "expires": 45.0}


def test_beat_schedule_as_crontab(settings: Settings) -> None:
    entry = build_beat_schedule(settings)[ORPHAN_ENTRY]
    assert entry["task"] == SWEEP_ORPHANS
    schedule = entry["schedule"]
    assert isinstance(schedule, crontab)
    assert schedule.minute == {0, 10, 20, 30, 40, 50}
    assert schedule.hour == {3}
    assert schedule.day_of_week == {1, 2, 3, 4, 5}
    assert entry["options"] == {"queue": "q.ctl", "expires": CRONTAB_EXPIRES_SECONDS}
    assert CRONTAB_EXPIRES_SECONDS > 0


def test_beat_schedule_has_exactly_the_two_entries(make_settings: Callable[..., Settings]
                                                   ) -> None:
    schedule = build_beat_schedule(make_settings())
    assert {e["task"] for e in schedule.values()} == {COORDINATE, SWEEP_ORPHANS}
    for entry in schedule.values():
        assert entry["options"]["queue"] == "statesweep.control"
        assert entry["options"]["expires"] > 0
    assert schedule[COORD_ENTRY]["schedule"] == 600.0
    assert schedule[ORPHAN_ENTRY]["schedule"] == 300.0


def test_celery_config_survives_a_killed_worker(settings: Settings) -> None:
    conf = celery_config(settings)
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert (conf["task_soft_time_limit"], conf["task_time_limit"]) == (50, 70)
    for key in ("broker_transport_options", "result_backend_transport_options"):
        assert conf[key]["visibility_timeout"] == 200
        assert conf[key]["visibility_timeout"] > conf["task_time_limit"]
    # Celery 5.x warns when this is left implicit; it must be set, and to retry.
    assert conf["broker_connection_retry_on_startup"] is True


def test_celery_config_is_observable_and_leaves_logging_to_us(settings: Settings) -> None:
    conf = celery_config(settings)
    assert conf["worker_send_task_events"] is True
    assert conf["task_send_sent_event"] is True
    assert conf["worker_hijack_root_logger"] is False
    assert conf["task_serializer"] == "json"
    assert conf["accept_content"] == ["json"]


def test_every_task_is_routed_to_its_queue(settings: Settings) -> None:
    conf = celery_config(settings)
    assert conf["task_default_queue"] == "q.ctl"
    assert {q.name for q in conf["task_queues"]} == {"q.ctl", "q.chunks"}
    assert conf["task_create_missing_queues"] is False
    assert conf["task_routes"] == {
        COORDINATE: {"queue": "q.ctl"},
        SWEEP_ORPHANS: {"queue": "q.ctl"},
        DELETE_CHUNK: {"queue": "q.chunks"},
    }
    assert conf["beat_schedule"] == build_beat_schedule(settings)


def test_every_registered_task_has_a_route() -> None:
    import workers.tasks  # noqa: F401 - registers the tasks on the module's app
    from workers.celery_app import app

    registered = {name for name in app.tasks if name.startswith("statesweep.")}
    assert registered == {COORDINATE, DELETE_CHUNK, SWEEP_ORPHANS}
    assert registered == set(app.conf.task_routes)


def test_client_app_carries_the_same_config(settings: Settings) -> None:
    client = build_app(settings, include_tasks=False)
    assert client.conf.task_default_queue == "q.ctl"
    assert client.conf.task_acks_late is True
    assert client.conf.broker_transport_options == {"visibility_timeout": 200,
                                                    "unacked_restore_throttle": 1}
    assert client.conf.broker_connection_retry_on_startup is True


def test_chunk_rate_limit_annotates_only_the_chunk_task() -> None:
    from workers.celery_app import DELETE_CHUNK, build_app, celery_config

    assert celery_config(Settings.from_env({}))["task_annotations"] == {}
    limited = Settings.from_env({"STATESWEEP_CHUNK_RATE_LIMIT": "20/s"})
    assert celery_config(limited)["task_annotations"] == {DELETE_CHUNK: {"rate_limit": "20/s"}}
    app = build_app(limited)
    app.loader.import_default_modules()
    assert app.tasks[DELETE_CHUNK].rate_limit == "20/s"
    assert app.tasks["statesweep.coordinate"].rate_limit is None
