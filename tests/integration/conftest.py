"""Fixtures for the integration tests: the run store on real Redis and on memory://, and the
CLI's seeded PostgreSQL (tests/integration/test_cli.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.cleanup_runs import memory_store
from tests.integration.test_cli import seeded  # noqa: F401 - a fixture
from tests.services import REDIS_URL, require
from workers.runs import RunStore


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, isolation: dict[str, str]) -> Iterator[RunStore]:
    """The run store on a real Redis (this test's key prefix) and on memory:// (fakeredis running
    the same Lua): every test taking it proves both."""
    prefix = isolation["STATESWEEP_KEY_PREFIX"]
    if request.param == "memory":
        yield memory_store(prefix)
        return
    require("Redis", "127.0.0.1", 6379)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield RunStore(client, prefix)
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()

