"""The cleanup counters (workers.metrics): bumped by the same Lua step that counts a chunk once,
so a redelivered chunk adds nothing; the in-process store keeps the same numbers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from workers import metrics
from workers.runs import MemoryRunRegistry, RedisRunRegistry

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_registry(redis_url: str, isolation: dict[str, str]) -> Iterator[RedisRunRegistry]:
    prefix = isolation["STATESWEEP_KEY_PREFIX"]
    reg = RedisRunRegistry(redis_url, prefix)
    yield reg
    keys = list(reg.client.scan_iter(match=f"{prefix}:*"))
    if keys:
        reg.client.delete(*keys)
    reg.client.close()


def play(reg: RedisRunRegistry | MemoryRunRegistry) -> metrics.Counters:
    """One run of four chunks: 1 and 2 delete (2 is redelivered twice), 3 fails for good
    (and is then redelivered), 4 deletes without being timed; two retries, one orphan batch."""
    assert reg.acquire("run-a", 60) is None
    reg.start("run-a", cutoff="2026-01-01T00:00:00+00:00", batch_size=10, source="test")
    for _ in range(4):
        reg.add_chunk("run-a", 10)
    reg.finish_planning("run-a")
    assert reg.chunk_done("run-a", 1, 10, 600, seconds=0.02, table="task_state")[0]
    assert reg.chunk_done("run-a", 2, 7, 600, seconds=3.0, table="task_state")[0]
    for _ in range(2):  # redelivered: the DELETE found nothing, the count must not move
        assert reg.chunk_done("run-a", 2, 0, 600, seconds=0.001, table="task_state") == (
            False, None)
    reg.chunk_failed("run-a", 3, "boom")
    reg.chunk_failed("run-a", 3, "boom")
    counted, finished = reg.chunk_done("run-a", 4, 5, 600, table="task_state")
    assert counted and finished is not None and finished.state == "failed"
    metrics.count_retry(reg)
    metrics.count_retry(reg)
    metrics.count_orphans_deleted(reg, "asset_state", 4)
    if isinstance(reg, RedisRunRegistry):
        return metrics.read_counters(reg.client, reg.prefix)
    return reg.metrics.read()


def test_chunks_count_once_and_the_histogram_is_cumulative(
        redis_registry: RedisRunRegistry) -> None:
    c = play(redis_registry)
    assert c.rows_deleted == {"task_state": 22, "asset_state": 4}
    assert (c.chunks_done, c.chunks_failed, c.chunks_retried) == (3, 1, 2)
    # Two timed chunks (0.02 s and 3 s); chunk 4 was counted but not timed.
    assert c.chunk_seconds_count == 2 and c.chunk_seconds_sum == pytest.approx(3.02)
    buckets = dict(c.chunk_seconds_buckets)
    assert [le for le, _ in c.chunk_seconds_buckets][-1] == "+Inf"
    assert (buckets["0.01"], buckets["0.025"], buckets["2.5"], buckets["5.0"],
            buckets["+Inf"]) == (0, 1, 1, 2, 2)
    counts = [n for _, n in c.chunk_seconds_buckets]
    assert counts == sorted(counts)


def test_the_memory_store_keeps_the_same_counters(redis_registry: RedisRunRegistry) -> None:
    assert play(MemoryRunRegistry()) == play(redis_registry)


def test_counters_read_zero_before_the_first_chunk(redis_registry: RedisRunRegistry) -> None:
    c = metrics.read_counters(redis_registry.client, redis_registry.prefix)
    assert (c.rows_deleted, c.chunks_done, c.chunk_seconds_count) == ({}, 0, 0)
    assert [n for _, n in c.chunk_seconds_buckets] == [0] * (
        len(metrics.CHUNK_SECONDS_BUCKETS) + 1)


def test_a_metric_that_cannot_be_counted_never_raises(redis_url: str) -> None:
    dead = RedisRunRegistry("redis://127.0.0.1:1/0", "sw:dead")
    with capture_logs() as logs:
        metrics.count_retry(dead)  # the run store may be why a chunk retries
        metrics.count_orphans_deleted(dead, "asset_state", 3)
    assert [(e["event"], e["error"]) for e in logs] == [
        ("retry_not_counted", "ConnectionError"), ("orphan_rows_not_counted", "ConnectionError")]
