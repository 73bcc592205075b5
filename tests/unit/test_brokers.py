"""The broker-dependent Celery configuration (no services): Redis options only on Redis,
quorum queues, confirms and heartbeats only on RabbitMQ."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from workers.brokers import DELIVERY_LIMIT, HEARTBEAT_SECONDS, is_amqp
from workers.celery_app import celery_config
from workers.settings import Settings

AMQP = "amqp://guest:guest@rabbit:5672//"


@pytest.mark.parametrize(("url", "amqp"), [
    (AMQP, True), ("amqps://u:p@h//", True), ("pyamqp://h//", True),
    ("amqp://u:pw1@h1//;amqp://u:pw2@h2//", True),
    ("redis://h:6379/0", False), ("rediss://h/0", False),
])
def test_is_amqp_reads_the_scheme_of_the_first_url(url: str, amqp: bool) -> None:
    assert is_amqp(url) is amqp


def test_rabbitmq_gets_quorum_queues_confirms_and_heartbeats(
        make_settings: Callable[..., Settings]) -> None:
    conf = celery_config(make_settings(broker_url=AMQP, control_queue="q.ctl",
                                       chunk_queue="q.chunks", visibility_timeout=600,
                                       chunk_time_limit=60, chunk_soft_time_limit=50))
    queues = {q.name: q for q in conf["task_queues"]}
    assert set(queues) == {"q.ctl", "q.chunks"}
    for name, q in queues.items():
        assert q.durable and not q.auto_delete
        assert q.queue_arguments == {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT}
        # Native delayed delivery binds topic exchanges only; each queue keeps its own.
        assert (q.exchange.name, q.exchange.type, q.routing_key) == (name, "topic", name)
    assert conf["task_default_exchange_type"] == "topic"
    assert conf["broker_transport_options"] == {"confirm_publish": True}
    assert conf["broker_heartbeat"] == HEARTBEAT_SECONDS
    assert conf["worker_detect_quorum_queues"] is True
    assert conf["broker_native_delayed_delivery_queue_type"] == "quorum"
    # The result backend is still Redis: its visibility timeout still applies there.
    assert conf["result_backend_transport_options"] == {"visibility_timeout": 600}


def test_redis_keeps_its_visibility_options_and_no_amqp_ones(
        make_settings: Callable[..., Settings]) -> None:
    conf = celery_config(make_settings(control_queue="q.ctl", chunk_queue="q.chunks"))
    assert conf["broker_transport_options"]["visibility_timeout"] == 90
    assert conf["broker_transport_options"]["unacked_restore_throttle"] == 1
    assert all(q.exchange.type == "direct" and not q.queue_arguments
               for q in conf["task_queues"])
    for key in ("broker_heartbeat", "worker_detect_quorum_queues",
                "broker_native_delayed_delivery_queue_type", "task_default_exchange_type"):
        assert key not in conf


def test_defect_quorum_retry_countdown_under_a_second_is_refused() -> None:
    """Celery refuses a countdown under one second on quorum queues and rejects the retry
    (tests/acceptance/test_pipeline.py::test_chunk_blocked_by_a_writer_retries_and_finishes
    [rabbitmq] shows it end to end); a chunk's retry therefore waits at least a second."""
    import workers.tasks

    assert min(workers.tasks._backoff(0) for _ in range(500)) >= 1
