"""Issue 22, item 3: while a run's chunks retry a transient error (the database away), `--wait`
says which error instead of a bare ETA, and `status` counts the retries; real Redis."""

from __future__ import annotations

import pytest

from tests.services import REDIS_URL, require, unique
from workers.cli.progress import Snapshot, render
from workers.cli.render import run_summary
from workers.runs import registry_for

pytestmark = pytest.mark.integration

ERROR = "OperationalError: connection to server at \"127.0.0.1\", port 5432 failed"


def test_a_retrying_chunk_names_its_error_on_the_run_and_in_the_bar() -> None:
    require("Redis", "127.0.0.1", 6379)
    store = registry_for(REDIS_URL, f"sw:{unique('retry')}")
    try:
        assert store.enqueue("r1", "test")
        key = f"{store.prefix}:run:r1"
        store.client.hset(key, mapping={"state": "running", "chunks_planned": 4,
                                        "expected_rows": 4000, "planning_done": 1})
        ttl = store.client.ttl(key)
        store.requeue("r1", 2, ERROR)
        store.requeue("r1", 3, ERROR)
        record = store.get("r1")
        assert record is not None
        assert (record.retries, record.retry_error) == (2, ERROR) and record.retry_at > 0
        assert 0 < store.client.ttl(key) <= ttl  # the record keeps its TTL
        bar = render(Snapshot.of(record))
        assert f"chunks retrying {ERROR} (2 retries so far)" in bar, bar
        assert "retries       2 chunk retries of a transient error" in run_summary(record)
        # A retry of a run with no record makes no key (every key has a TTL).
        store.requeue("gone", 1, ERROR)
        assert not store.client.exists(f"{store.prefix}:run:gone")
    finally:
        for k in store.client.scan_iter(f"{store.prefix}:*"):
            store.client.delete(k)
