"""RedisRunRegistry against a real Redis: the single-flight lock with its owner token and TTL,
run records, chunks counted once, and a run finished exactly once under concurrency."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from workers.coordinator import LockKeeper
from workers.runs import RUN_RETENTION_SECONDS, MemoryRunRegistry, RedisRunRegistry, registry_for

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(redis_url: str, isolation: dict[str, str]) -> Iterator[RedisRunRegistry]:
    prefix = isolation["STATESWEEP_KEY_PREFIX"]
    reg = RedisRunRegistry(redis_url, prefix)
    yield reg
    keys = list(reg.client.scan_iter(match=f"{prefix}:*"))
    if keys:
        reg.client.delete(*keys)
    reg.client.close()


def start_run(reg: RedisRunRegistry, run_id: str, chunks: int, rows_each: int = 10) -> None:
    assert reg.acquire(run_id, 60) is None
    reg.start(run_id, cutoff="2026-01-01T00:00:00+00:00", batch_size=rows_each, source="test")
    for _ in range(chunks):
        reg.add_chunk(run_id, rows_each)


# --- the lock -----------------------------------------------------------------------------------


def test_lock_has_one_owner_and_only_the_owner_renews_or_releases(
        registry: RedisRunRegistry) -> None:
    lock = f"{registry.prefix}:lock"
    assert registry.acquire("run-a", 30) is None
    assert registry.acquire("run-b", 30) == "run-a"
    assert registry.active_run() == "run-a"
    assert 0 < registry.client.ttl(lock) <= 30  # type: ignore[operator]

    assert registry.renew("run-b", 600) is False
    assert registry.client.ttl(lock) <= 30  # type: ignore[operator]
    assert registry.renew("run-a", 600) is True
    assert 30 < registry.client.ttl(lock) <= 600  # type: ignore[operator]

    registry.release("run-b")
    assert registry.active_run() == "run-a"
    registry.release("run-a")
    assert registry.active_run() is None
    assert registry.acquire("run-b", 30) is None


def test_lock_frees_itself_when_its_ttl_runs_out(registry: RedisRunRegistry) -> None:
    assert registry.acquire("run-a", 1) is None
    time.sleep(1.2)
    assert registry.active_run() is None
    assert registry.renew("run-a", 30) is False  # a lapsed owner cannot take it back by renewing
    assert registry.acquire("run-b", 30) is None


def test_racing_acquires_have_exactly_one_winner(registry: RedisRunRegistry,
                                                 redis_url: str) -> None:
    results: dict[str, str | None] = {}
    barrier = threading.Barrier(8)

    def trigger(run_id: str) -> None:
        own = RedisRunRegistry(redis_url, registry.prefix)  # as separate processes would
        barrier.wait()
        results[run_id] = own.acquire(run_id, 30)
        own.client.close()

    threads = [threading.Thread(target=trigger, args=(f"run-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r, holder in results.items() if holder is None]
    assert len(winners) == 1
    assert {holder for holder in results.values() if holder is not None} == set(winners)


def test_lock_keeper_holds_the_lock_past_its_ttl_while_planning(
        registry: RedisRunRegistry) -> None:
    assert registry.acquire("run-a", 1) is None
    with LockKeeper(registry, "run-a", 1) as keeper:
        time.sleep(2.0)
        assert registry.active_run() == "run-a"
        keeper.check()
    time.sleep(1.2)  # stopped keeper: the TTL runs out again
    assert registry.active_run() is None


# --- runs ---------------------------------------------------------------------------------------


def test_run_record_tracks_planning_and_chunks_and_finishes_on_the_last_chunk(
        registry: RedisRunRegistry) -> None:
    start_run(registry, "run-a", chunks=3)
    record = registry.get("run-a")
    assert record is not None
    assert (record.state, record.chunks_planned, record.expected_rows, record.cutoff,
            record.source) == ("planning", 3, 30, "2026-01-01T00:00:00+00:00", "test")
    assert registry.finish_planning("run-a") is None
    assert registry.get("run-a").state == "running"  # type: ignore[union-attr]

    assert registry.chunk_done("run-a", 1, 10, 600) == (True, None)
    assert registry.chunk_done("run-a", 2, 7, 600) == (True, None)
    counted, finished = registry.chunk_done("run-a", 3, 10, 600)
    assert counted and finished is not None
    assert (finished.state, finished.chunks_done, finished.rows_deleted) == ("finished", 3, 27)
    assert finished.started_at <= finished.planned_at <= finished.finished_at
    assert registry.active_run() is None  # the finished run freed the lock
    run_key = f"{registry.prefix}:run:run-a"
    assert 0 < registry.client.ttl(run_key) <= RUN_RETENTION_SECONDS  # type: ignore[operator]
    assert registry.client.ttl(f"{run_key}:done") > 0  # type: ignore[operator]


def test_run_finishes_when_planning_ends_after_the_last_chunk(
        registry: RedisRunRegistry) -> None:
    start_run(registry, "run-a", chunks=2)
    assert registry.chunk_done("run-a", 1, 10, 600) == (True, None)
    assert registry.chunk_done("run-a", 2, 10, 600) == (True, None)  # planning not done yet
    finished = registry.finish_planning("run-a")
    assert finished is not None and (finished.state, finished.rows_deleted) == ("finished", 20)
    assert registry.active_run() is None


def test_a_redelivered_chunk_is_counted_once(registry: RedisRunRegistry) -> None:
    start_run(registry, "run-a", chunks=2)
    registry.finish_planning("run-a")
    assert registry.chunk_done("run-a", 1, 10, 600) == (True, None)
    assert registry.chunk_done("run-a", 1, 10, 600) == (False, None)
    record = registry.get("run-a")
    assert record is not None and (record.chunks_done, record.rows_deleted) == (1, 10)


def test_concurrent_chunks_finish_the_run_exactly_once(registry: RedisRunRegistry,
                                                       redis_url: str) -> None:
    chunks = 60
    start_run(registry, "run-a", chunks=chunks)
    registry.finish_planning("run-a")
    finishes: list[int] = []
    barrier = threading.Barrier(6)

    def worker(offset: int) -> None:
        own = RedisRunRegistry(redis_url, registry.prefix)
        barrier.wait()
        # Every chunk is reported twice (two workers, one redelivery), in different orders.
        for n in range(1, chunks + 1):
            chunk = (n + offset * 7) % chunks + 1
            _, finished = own.chunk_done("run-a", chunk, 10, 600)
            if finished is not None:
                finishes.append(chunk)
        own.client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(finishes) == 1
    record = registry.get("run-a")
    assert record is not None
    assert (record.state, record.chunks_done, record.rows_deleted) == ("finished", chunks, 600)


def test_chunk_done_renews_the_owners_lock_and_ignores_unknown_runs(
        registry: RedisRunRegistry) -> None:
    start_run(registry, "run-a", chunks=2)
    registry.finish_planning("run-a")
    lock = f"{registry.prefix}:lock"
    assert registry.client.ttl(lock) <= 60  # type: ignore[operator]
    registry.chunk_done("run-a", 1, 10, 900)
    assert 60 < registry.client.ttl(lock) <= 900  # type: ignore[operator]
    assert registry.chunk_done("no-such-run", 1, 10, 900) == (False, None)
    assert registry.get("no-such-run") is None
    assert not registry.client.exists(f"{registry.prefix}:run:no-such-run:done")


def test_fail_records_the_error_and_frees_only_its_own_lock(registry: RedisRunRegistry) -> None:
    start_run(registry, "run-a", chunks=1)
    registry.fail("run-a", "OperationalError: server closed the connection")
    record = registry.get("run-a")
    assert record is not None and record.state == "failed" and "server closed" in record.error
    assert registry.active_run() is None

    assert registry.acquire("run-b", 60) is None
    registry.fail("run-c", "never started: database down")  # before start() wrote anything
    failed = registry.get("run-c")
    assert failed is not None and (failed.run_id, failed.state) == ("run-c", "failed")
    assert registry.active_run() == "run-b"


def test_recent_lists_newest_runs_first(registry: RedisRunRegistry) -> None:
    for run_id in ("run-1", "run-2", "run-3"):
        registry.start(run_id, cutoff="2026-01-01T00:00:00+00:00", batch_size=1, source="t")
        time.sleep(0.01)
    assert [r.run_id for r in registry.recent()] == ["run-3", "run-2", "run-1"]
    assert [r.run_id for r in registry.recent(limit=2)] == ["run-3", "run-2"]


def test_registry_for_picks_the_store_by_url(redis_url: str, isolation: dict[str, str]) -> None:
    prefix = isolation["STATESWEEP_KEY_PREFIX"]
    assert isinstance(registry_for("memory://", prefix), MemoryRunRegistry)
    reg = registry_for(redis_url, prefix)
    assert isinstance(reg, RedisRunRegistry) and reg is registry_for(redis_url, prefix)
    assert reg.client.ping()
    with pytest.raises(redis.ConnectionError):
        RedisRunRegistry("redis://127.0.0.1:1/0", prefix).active_run()


def test_a_chunk_that_failed_for_good_ends_the_run_failed_and_frees_the_lock(
        redis_url: str, isolation: dict[str, str]) -> None:
    from workers.runs import RedisRunRegistry

    reg = RedisRunRegistry(redis_url, isolation["STATESWEEP_KEY_PREFIX"])
    assert reg.acquire("r1", 60) is None
    reg.start("r1", cutoff="2026-01-01T00:00:00+00:00", batch_size=10, source="test")
    reg.add_chunk("r1", 10)
    reg.add_chunk("r1", 10)
    reg.finish_planning("r1")
    counted, ended = reg.chunk_done("r1", 1, 10, 600)
    assert counted and ended is None
    ended = reg.chunk_failed("r1", 2, "chunk 2 failed: OperationalError: gone")
    assert ended is not None and ended.state == "failed"
    assert (ended.chunks_done, ended.chunks_failed, ended.rows_deleted) == (2, 1, 10)
    assert "OperationalError" in ended.error
    assert reg.active_run() is None
    # A redelivered success of the failed chunk neither counts again nor revives the run.
    assert reg.chunk_done("r1", 2, 10, 600) == (False, None)
    assert reg.chunk_failed("r1", 2, "again") is None
    record = reg.get("r1")
    assert record is not None and record.state == "failed"


def test_chunk_ranges_are_kept_so_missing_chunks_can_be_found(
        redis_url: str, isolation: dict[str, str]) -> None:
    from workers.runs import RedisRunRegistry

    reg = RedisRunRegistry(redis_url, isolation["STATESWEEP_KEY_PREFIX"])
    assert reg.acquire("r1", 60) is None
    reg.start("r1", cutoff="2026-01-01T00:00:00+00:00", batch_size=10, source="test")
    for number, lo, hi in [(1, 1, 19), (2, 20, 41), (3, 42, 60)]:
        reg.add_chunk("r1", 10, (number, lo, hi))
    reg.finish_planning("r1")
    before = reg.get("r1")
    assert before is not None and before.last_progress_at == 0.0
    reg.chunk_done("r1", 2, 10, 600)
    after = reg.get("r1")
    assert after is not None and after.last_progress_at >= before.started_at
    assert reg.missing_chunks("r1") == [(1, 1, 19), (3, 42, 60)]
    assert reg.missing_chunks("no-such-run") == []
