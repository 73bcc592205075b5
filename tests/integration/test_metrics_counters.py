"""The cleanup counters (workers.metrics): bumped by the same Lua step that counts a chunk once,
so a redelivered chunk adds nothing; Redis and the in-process store (memory://, the same Lua on
fakeredis) keep the same numbers."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from tests.cleanup_runs import id_plan, memory_store, start_plan
from workers import metrics
from workers.runs import Gate, RunStore

pytestmark = pytest.mark.integration

KW = {"lock_ttl": 600, "window": 16, "resend_after": 3600, "gate": Gate()}


def play(reg: RunStore) -> metrics.Counters:
    """One run of four chunks: 1 and 2 delete (2 is redelivered twice), 3 fails for good
    (and is then redelivered), 4 deletes without being timed; two retries, one orphan batch."""
    start_plan(reg, "run-a", id_plan(4))
    fin = lambda n, rows, **kw: reg.finish_chunk("run-a", n, "ids", rows, 10, **KW, **kw)  # noqa: E731
    assert fin(1, 10, seconds=0.02, table="task_state")[0]
    assert fin(2, 7, seconds=3.0, table="task_state")[0]
    for _ in range(2):  # redelivered: the DELETE found nothing, the count must not move
        assert not fin(2, 0, seconds=0.001, table="task_state")[0]
    assert fin(3, 0, error="boom", table="task_state")[0]
    assert not fin(3, 0, error="boom", table="task_state")[0]
    counted, window = fin(4, 5, table="task_state")
    assert counted and window.finished is not None and window.finished.state == "failed"
    metrics.count_retry(reg)
    metrics.count_retry(reg)
    metrics.count_orphans_deleted(reg, "asset_state", 4)
    return metrics.read_counters(reg.client, reg.prefix)


def test_chunks_count_once_and_the_histogram_is_cumulative(store: RunStore) -> None:
    c = play(store)
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


def test_the_memory_store_keeps_the_same_counters(store: RunStore) -> None:
    assert play(memory_store("sw:metrics")) == play(store)


def test_counters_read_zero_before_the_first_chunk(store: RunStore) -> None:
    c = metrics.read_counters(store.client, store.prefix)
    assert (c.rows_deleted, c.chunks_done, c.chunk_seconds_count) == ({}, 0, 0)
    assert [n for _, n in c.chunk_seconds_buckets] == [0] * (
        len(metrics.CHUNK_SECONDS_BUCKETS) + 1)


def test_a_metric_that_cannot_be_counted_never_raises(redis_url: str) -> None:
    import redis

    dead = RunStore(redis.Redis.from_url("redis://127.0.0.1:1/0", decode_responses=True),
                    "sw:dead")
    with capture_logs() as logs:
        metrics.count_retry(dead)  # the run store may be why a chunk retries
        metrics.count_orphans_deleted(dead, "asset_state", 3)
    assert [(e["event"], e["error"]) for e in logs] == [
        ("retry_not_counted", "ConnectionError"), ("orphan_rows_not_counted", "ConnectionError")]
