"""Celery beat's schedule and the Celery configuration derived from settings (no services)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from celery.schedules import crontab

from beat_schedule import CRONTAB_EXPIRES_SECONDS, build_beat_schedule
from workers.celery_app import (
    ABORT,
    COORDINATE,
    DB_CLEAN,
    DB_CLEAN_CHUNK,
    DB_CLEAN_PUMP,
    DELETE_CHUNK,
    PAUSE,
    PUMP,
    RESUME,
    SWEEP_ORPHANS,
    build_app,
    celery_config,
)
from workers.settings import Settings

COORD_ENTRY = "statesweep-cleanup-task-state"
ORPHAN_ENTRY = "statesweep-sweep-orphaned-asset-state"
PUMP_ENTRY = "statesweep-pump"
CONTROL = (COORDINATE, SWEEP_ORPHANS, PUMP, PAUSE, RESUME, ABORT, DB_CLEAN, DB_CLEAN_PUMP)


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


def test_beat_schedule_has_exactly_the_three_entries(make_settings: Callable[..., Settings]
                                                     ) -> None:
    schedule = build_beat_schedule(make_settings(pump_interval_seconds=20))
    assert {e["task"] for e in schedule.values()} == {COORDINATE, SWEEP_ORPHANS, PUMP}
    for entry in schedule.values():
        assert entry["options"]["queue"] == "statesweep.control"
        assert entry["options"]["expires"] > 0
    assert schedule[COORD_ENTRY]["schedule"] == 600.0
    assert schedule[ORPHAN_ENTRY]["schedule"] == 300.0
    # The pump is the active run's heartbeat: it expires after one interval, never piles up.
    assert (schedule[PUMP_ENTRY]["schedule"], schedule[PUMP_ENTRY]["options"]["expires"]) == (
        20.0, 20.0)


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
    assert conf["task_routes"] == {**{name: {"queue": "q.ctl"} for name in CONTROL},
                                   DELETE_CHUNK: {"queue": "q.chunks"},
                                   DB_CLEAN_CHUNK: {"queue": "q.chunks"}}
    assert conf["beat_schedule"] == build_beat_schedule(settings)


def test_every_registered_task_has_a_route() -> None:
    import workers.dbclean.tasks  # noqa: F401 - registers db-clean's tasks too
    import workers.tasks  # noqa: F401 - registers the tasks on the module's app
    from workers.celery_app import app

    registered = {name for name in app.tasks if name.startswith("statesweep.")}
    assert registered == {*CONTROL, DELETE_CHUNK, DB_CLEAN_CHUNK}
    assert registered == set(app.conf.task_routes)


def test_client_app_carries_the_same_config(settings: Settings) -> None:
    client = build_app(settings, include_tasks=False)
    assert client.conf.task_default_queue == "q.ctl"
    assert client.conf.task_acks_late is True
    assert client.conf.broker_transport_options == {"visibility_timeout": 200,
                                                    "unacked_restore_throttle": 1}
    assert client.conf.broker_connection_retry_on_startup is True


def test_chunk_rate_limit_is_one_schedule_for_all_workers_not_a_celery_annotation() -> None:
    """Celery's rate_limit holds per worker process, so N workers would start N times the rate;
    the limit is kept as start slots in the run store instead (tests/integration/
    test_run_store.py proves their spacing)."""
    limited = Settings.from_env({"STATESWEEP_CHUNK_RATE_LIMIT": "20/s"})
    assert limited.chunk_rate_per_second == 20.0
    assert not celery_config(limited).get("task_annotations")
    app = build_app(limited)
    app.loader.import_default_modules()
    assert app.tasks[DELETE_CHUNK].rate_limit is None


def test_chunk_retries_back_off_exponentially_with_jitter() -> None:
    from workers.tasks import _backoff

    for retries in range(12):
        waits = [_backoff(retries) for _ in range(200)]
        # At least a second (RabbitMQ's delay queues refuse less), plus the jittered backoff.
        assert all(1.0 <= w <= 1.0 + min(60.0, 0.5 * 2 ** retries) for w in waits)
        assert len(set(waits)) > 100  # jittered, so redelivered chunks do not retry in step
    assert max(_backoff(3) for _ in range(200)) > 3.0  # grows: the cap at 3 retries is 1 + 4 s


def test_only_lost_connections_and_timeouts_are_retried() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

    from workers.tasks import is_transient

    assert is_transient(OperationalError("DELETE", {}, Exception("lock timeout")))
    assert is_transient(RedisConnectionError("gone"))
    assert is_transient(InterfaceError("DELETE", {}, Exception("closed"),
                                       connection_invalidated=True))
    assert not is_transient(InterfaceError("DELETE", {}, Exception("bad")))
    assert not is_transient(IntegrityError("DELETE", {}, Exception("fk")))


def test_the_router_sends_each_task_to_a_declared_queue_of_its_own_exchange(
        make_settings: Callable[..., Settings]) -> None:
    client = build_app(make_settings(control_queue="q.control", chunk_queue="q.chunks"),
                       include_tasks=False)
    for name in CONTROL:
        assert client.amqp.router.route({}, name)["queue"].name == "q.control", name
    assert client.amqp.router.route({}, DELETE_CHUNK)["queue"].name == "q.chunks"
    # Anything unrouted lands on the control queue, which every worker consumes.
    assert client.amqp.router.route({}, "celery.some_builtin")["queue"].name == "q.control"
    declared = client.amqp.queues
    assert set(declared) == {"q.control", "q.chunks"}
    for q in declared.values():
        # Own exchange and key: a message for one queue can never be bound into the other.
        assert (q.exchange.name, q.routing_key) == (q.name, q.name)
