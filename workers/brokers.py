"""Celery settings that depend on the broker: Redis or RabbitMQ (AMQP).

Redis redelivers a message a consumer took and never acknowledged only after the visibility
timeout, so those options matter there and nowhere else. RabbitMQ redelivers as soon as the
consumer's connection closes (a SIGKILLed worker's socket is closed by the kernel at once) or its
heartbeats stop (a host that fell off the network); its queues are declared as quorum queues,
replicated and durable, which survive a broker restart with their messages.

The run store and the single-flight lock stay in Redis whichever broker carries the tasks.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from kombu import Exchange, Queue

from workers.settings import Settings, is_redis

AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")

#: Seconds between AMQP heartbeats. RabbitMQ drops a connection after two missed heartbeats,
#: so a partitioned worker's unacknowledged chunk returns to the queue within about 2x this;
#: the worker notices the dead broker connection in the same time and reconnects.
HEARTBEAT_SECONDS = 10

#: Deliveries of one message before a quorum queue drops it: a chunk that kills every worker it
#: reaches (a poison message) stops cycling. Celery's own retries publish a new message and do
#: not count; a run whose chunk was dropped stalls, and the next trigger sends it again.
DELIVERY_LIMIT = 10


def is_amqp(url: str) -> bool:
    """Whether *url* (or the first of a ``;``-separated failover list) is a RabbitMQ broker."""
    return urlsplit(url.split(";", 1)[0].strip()).scheme in AMQP_SCHEMES


def task_queues(settings: Settings) -> tuple[Queue, ...]:
    """The control and chunk queues, each with its own exchange and routing key.

    Left to Celery's defaults both queues would be bound to the default exchange under the
    control queue's routing key, so a message published by exchange and key would land in both.
    On RabbitMQ the exchanges are topic exchanges: Celery's native delayed delivery (how a
    retry's countdown works with quorum queues, which cannot hold a message back in the worker
    under a global QoS) binds only non-direct exchanges, and falls back to holding the message
    in the worker for a direct one.
    """
    names = (settings.control_queue, settings.chunk_queue)
    if not is_amqp(settings.broker_url):
        return tuple(Queue(q, Exchange(q, "direct"), routing_key=q) for q in names)
    quorum = {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT}
    return tuple(Queue(q, Exchange(q, "topic", durable=True), routing_key=q, durable=True,
                       queue_arguments=quorum) for q in names)


def broker_config(settings: Settings) -> dict[str, Any]:
    """The broker-dependent part of :func:`workers.celery_app.celery_config`."""
    conf: dict[str, Any] = {"task_queues": task_queues(settings)}
    if is_redis(settings.result_backend):
        conf["result_backend_transport_options"] = {
            "visibility_timeout": settings.visibility_timeout}
    if is_amqp(settings.broker_url):
        conf.update({
            # A publish returns once RabbitMQ has the message: a chunk the coordinator sent is
            # in the queue, not in a socket buffer of a coordinator about to die.
            "broker_transport_options": {"confirm_publish": True},
            "broker_heartbeat": HEARTBEAT_SECONDS,
            # The control queue's exchange is also the default one: the same type everywhere.
            "task_default_exchange_type": "topic",
            # Quorum queues refuse a global QoS; Celery then sets a per-consumer prefetch.
            "worker_detect_quorum_queues": True,
            # Countdowns (chunk retries) wait in RabbitMQ's delay queues, not in the worker.
            "broker_native_delayed_delivery_queue_type": "quorum",
        })
    else:
        conf["broker_transport_options"] = {
            # Redis redelivers unacknowledged messages after this; well above the hard limit so
            # a running chunk is never handed to a second worker.
            "visibility_timeout": settings.visibility_timeout,
            # kombu scans for unacknowledged messages past their visibility timeout only every
            # unacked_restore_interval (10 s) x unacked_restore_throttle (10) by default;
            # scanning every interval makes a killed worker's chunk come back ~90 s sooner.
            "unacked_restore_throttle": 1,
        }
    return conf
