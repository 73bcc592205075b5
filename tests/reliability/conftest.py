"""Fixtures of the reliability suite: every test is marked ``reliability`` and may record its
scenario's numbers (rows expired / live before and after, and its outcome) as one JSON line in
the file named by STATESWEEP_RELIABILITY_REPORT; ``python -m tests.reliability.report FILE``
prints them as a table. Without the variable the line is printed (visible with ``-s``)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.brokers import Broker, machine_rabbitmq, rabbit_vhost
from tests.reliability.faults import RedisServer, own_redis
from tests.reliability.pipeline import Counts, seed_database
from workers.schema import Tables
from workers.seed import SeedSpec

REPORT_ENV = "STATESWEEP_RELIABILITY_REPORT"
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


class Scenario:
    """The numbers one scenario reports: rows expired and live, before and after."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.data: dict[str, Any] = {}
        self.started = time.monotonic()

    def before(self, c: Counts) -> None:
        self.data.update(expired_before=c.expired, live_before=c.live)

    def after(self, c: Counts) -> None:
        self.data.update(expired_after=c.expired, live_after=c.live)

    def note(self, **extra: Any) -> None:
        self.data.update(extra)


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> Iterator[Scenario]:
    s = Scenario(request.node.name)
    yield s
    reports = request.node.stash.get(_REPORTS, {})
    call = reports.get("call")
    line = {"scenario": s.name, **s.data, "seconds": round(time.monotonic() - s.started, 1),
            "result": "pass" if call is not None and call.passed else "fail"}
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
    else:
        print("scenario", json.dumps(line, default=str))


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for this test (broker, results and run store)."""
    with own_redis() as server:
        yield server


@pytest.fixture
def fault_broker(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Broker]:
    """The broker of a fault scenario, parametrised indirectly over BROKERS: the test's private
    Redis (which is then broker, results and run store at once), or a vhost of its own on the
    machine's RabbitMQ with the private Redis as results and run store."""
    if getattr(request, "param", "redis") == "redis":
        yield Broker("redis", redis_server.url)
        return
    with rabbit_vhost(machine_rabbitmq()) as broker:
        yield broker


Seeder = Callable[[SeedSpec], tuple[Engine, Tables]]


@pytest.fixture
def seeded(pg_url: str) -> Iterator[Seeder]:
    """Seed this test's fresh PostgreSQL database; its engines are closed before it is dropped."""
    engines: list[Engine] = []

    def seed(spec: SeedSpec) -> tuple[Engine, Tables]:
        engine, tables = seed_database(pg_url, spec)
        engines.append(engine)
        return engine, tables

    yield seed
    for engine in engines:
        engine.dispose()
