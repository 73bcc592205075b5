"""The run store's atomic steps, each test on a real Redis and on memory:// (fakeredis running the
same Lua): the single-flight lock, the in-flight window, a run finished exactly once, holds,
resends, abort and the shared rate schedule. Tests that need rows are in test_run_guards.py."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.cleanup_runs import another_connection, id_plan, start_plan
from workers import control
from workers.planners import ChunkRange
from workers.runs import RUN_RETENTION_SECONDS, Gate, RunStore, registry_for

pytestmark = pytest.mark.integration

KW: dict[str, Any] = {"lock_ttl": 3600, "window": 3, "resend_after": 3600.0, "gate": Gate()}
W2: dict[str, Any] = {**KW, "window": 2}


def finish(store: RunStore, run_id: str, number: int, rows: int = 10,
           **overrides: Any) -> tuple[bool, list[tuple[int, ChunkRange]], object]:
    counted, window = store.finish_chunk(run_id, number, "ids", rows, 10, **{**KW, **overrides})
    return counted, window.chunks, window.finished


# --- the lock -----------------------------------------------------------------------------------


def test_lock_has_one_owner_and_only_the_owner_renews_or_releases(store: RunStore) -> None:
    assert store.acquire("run-a", 30) is None
    assert store.acquire("run-b", 30) == "run-a"
    assert store.acquire("run-a", 30) is None  # the holder's own id: already held
    assert store.active_run() == "run-a" and 0 < store.lock_ttl() <= 30
    assert store.renew("run-b", 600) is False and store.lock_ttl() <= 30
    assert store.renew("run-a", 600) is True and 30 < store.lock_ttl() <= 600
    store.release("run-b")
    assert store.active_run() == "run-a"
    store.release("run-a")
    assert store.active_run() is None and store.acquire("run-b", 30) is None


def test_lock_frees_itself_when_its_ttl_runs_out(store: RunStore) -> None:
    assert store.acquire("run-a", 1) is None
    deadline = time.monotonic() + 10
    while store.active_run() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.active_run() is None
    assert store.renew("run-a", 30) is False  # a lapsed owner cannot take it back by renewing
    assert store.acquire("run-b", 30) is None


def test_racing_acquires_have_exactly_one_winner(store: RunStore) -> None:
    results: dict[str, str | None] = {}
    barrier = threading.Barrier(8)

    def trigger(run_id: str) -> None:
        own = another_connection(store)
        barrier.wait()
        results[run_id] = own.acquire(run_id, 30)

    threads = [threading.Thread(target=trigger, args=(f"run-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r, holder in results.items() if holder is None]
    assert len(winners) == 1
    assert {h for h in results.values() if h is not None} == set(winners)


def test_defect_lock_keeper_cannot_cut_a_planned_runs_lock(store: RunStore) -> None:
    """Issue 15 item 5: once planned, the lock lives for the run timeout, and a late renewal
    with the short planning TTL (what the old lock keeper sent) never shortens it."""
    start_plan(store, "run-a", id_plan(3), lock_ttl=3600)
    assert 60 < store.lock_ttl() <= 3600
    assert store.renew("run-a", 60) is True
    assert 60 < store.lock_ttl() <= 3600
    finish(store, "run-a", 1, lock_ttl=120)  # a finished chunk's renewal: never below
    assert 120 < store.lock_ttl() <= 3600
    assert store.acquire("run-b", 60) == "run-a"


def test_start_refuses_an_id_that_already_ran(store: RunStore) -> None:
    """The run-store half of issue 15 item 2: START never writes a plan over an ended run's
    record (its window and counts would mix with the new run's)."""
    start_plan(store, "nightly", id_plan(1))
    assert finish(store, "nightly", 1)[2] is not None
    done = store.get("nightly")
    assert store.acquire("nightly", 60) is None
    again = store.start("nightly", id_plan(3), cutoff="c", batch_size=10, source="test",
                        window=3, lock_ttl=3600, resend_after=3600.0, gate=Gate())
    assert again == "finished" and store.get("nightly") == done
    assert store.inflight("nightly") == []


# --- the window ---------------------------------------------------------------------------------


def test_window_never_holds_more_than_its_size_and_is_topped_up_on_finish(
        store: RunStore) -> None:
    started = start_plan(store, "run-a", id_plan(10), window=3)
    sent = list(started.chunks)
    assert [n for n, _ in sent] == [1, 2, 3]
    done = 0
    while done < 10:
        assert len(store.inflight("run-a")) <= 3
        number = min(n for n, _, _, _ in store.inflight("run-a"))
        counted, more, finished = finish(store, "run-a", number)
        assert counted
        done += 1
        sent += more
        assert len(more) == (1 if len(sent) < 10 or more else 0)
    assert finished is not None and finished.state == "finished"  # type: ignore[attr-defined]
    # Every chunk number went out once, and the ranges tile the plan without gap or overlap.
    assert [n for n, _ in sent] == list(range(1, 11))
    assert [(r.lo, r.hi) for _, r in sent] == [(1 + 10 * i, 11 + 10 * i) for i in range(10)]
    assert store.active_run() is None


def test_concurrent_finishes_count_each_chunk_once_and_finish_the_run_once(
        store: RunStore) -> None:
    start_plan(store, "run-a", id_plan(20), window=20)
    outcomes: list[tuple[bool, object]] = []
    barrier = threading.Barrier(40)

    def worker(number: int, rows: int) -> None:
        own = another_connection(store)
        barrier.wait()
        counted, _, finished = finish(own, "run-a", number, rows, window=20)
        outcomes.append((counted, finished))

    # Each chunk finished twice at once: the copy that deleted its rows, and a redelivered one
    # that found nothing left.
    threads = [threading.Thread(target=worker, args=(n, rows))
               for n in range(1, 21) for rows in (5, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counted for counted, _ in outcomes) == 20
    assert len([f for _, f in outcomes if f is not None]) == 1
    record = store.get("run-a")
    assert record is not None
    assert (record.state, record.chunks_done, record.rows_deleted) == ("finished", 20, 100)
    assert store.active_run() is None


def test_parked_chunks_are_sent_again_after_resume(store: RunStore) -> None:
    start_plan(store, "run-a", id_plan(4), window=2)
    control.pause(store, by="ops", reason="maintenance")
    status, detail = store.begin_chunk("run-a", 1, ChunkRange("ids", 1, 11), Gate())
    assert (status, detail) == ("held", ["paused", 1])
    assert store.begin_chunk("run-a", 2, ChunkRange("ids", 11, 21), Gate())[0] == "held"
    assert [parked for _, _, _, parked in store.inflight("run-a")] == [True, True]
    held = store.pump("run-a", "ids", **W2)
    assert held is not None and held.chunks == [] and held.held == "paused"
    control.resume(store, by="ops")
    again = store.pump("run-a", "ids", **W2)
    assert again is not None
    # The same two chunks, same numbers and ranges; the window is full, so nothing new is cut.
    assert again.chunks == [(1, ChunkRange("ids", 1, 11)), (2, ChunkRange("ids", 11, 21))]
    assert store.begin_chunk("run-a", 1, ChunkRange("ids", 1, 11), Gate())[0] == "ok"
    record = store.get("run-a")
    assert record is not None and record.holds == 1 and record.chunks_planned == 2


def test_stale_chunks_are_sent_again_by_the_pump(store: RunStore) -> None:
    start_plan(store, "run-a", id_plan(5), window=2)
    store.confirm("run-a", [1, 2])  # published, as the coordinator's sender confirms
    fresh = store.pump("run-a", "ids", **W2)
    assert fresh is not None and fresh.chunks == []  # sent a moment ago: not lost yet
    time.sleep(0.01)  # let the clock move past the send time
    stale = store.pump("run-a", "ids", **{**W2, "resend_after": 0.0})
    assert stale is not None
    assert stale.chunks == [(1, ChunkRange("ids", 1, 11)), (2, ChunkRange("ids", 11, 21))]


def test_abort_ends_the_run_frees_the_lock_and_later_chunks_are_skipped(
        store: RunStore) -> None:
    start_plan(store, "run-a", id_plan(5), window=2)
    ended = control.abort(store, "run-a", by="ops")
    assert (ended.state, ended.error) == ("aborted", "aborted by ops")
    assert store.active_run() is None and store.inflight("run-a") == []
    assert store.begin_chunk("run-a", 2, ChunkRange("ids", 11, 21), Gate()) == (
        "ended", ["aborted"])
    assert finish(store, "run-a", 1)[0] is False
    assert store.pump("run-a", "ids", **KW) is None
    record = store.get("run-a")
    assert record is not None and (record.state, record.chunks_done) == ("aborted", 0)


def test_rate_slots_are_spaced_one_interval_apart_across_callers(store: RunStore) -> None:
    """Callers at the same instant get slots 1/rate apart, whoever asks first."""
    waits: list[float] = []
    barrier = threading.Barrier(6)

    def caller() -> None:
        own = another_connection(store)
        barrier.wait()
        # The script's clock argument fixed, so the schedule itself is what is compared.
        waits.append(float(own._call("RATE", [own._k("rate")], [1000.0, 0.25])))

    threads = [threading.Thread(target=caller) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(waits) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]


def test_a_pause_with_a_duration_ends_by_itself(store: RunStore) -> None:
    paused = store.pause("ops", "deploy", 0.3)
    assert paused.until > paused.at and store.paused() is not None
    deadline = time.monotonic() + 10
    while store.paused() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.paused() is None


def test_finishing_a_chunk_of_an_unknown_run_records_nothing(store: RunStore) -> None:
    counted, chunks, finished = finish(store, "no-such-run", 1)
    assert (counted, chunks, finished) == (False, [], None)
    assert store.get("no-such-run") is None
    assert store.client.exists(f"{store.prefix}:run:no-such-run:inflight") == 0


# --- records ------------------------------------------------------------------------------------


def test_fail_records_the_error_and_frees_only_its_own_lock(store: RunStore) -> None:
    assert store.acquire("run-b", 60) is None
    store.fail("run-a", "OperationalError: database is down")
    record = store.get("run-a")
    assert record is not None and (record.state, record.error) == (
        "failed", "OperationalError: database is down")
    assert store.active_run() == "run-b"
    assert 0 < store.client.ttl(f"{store.prefix}:run:run-a") <= RUN_RETENTION_SECONDS


def test_enqueue_refuses_a_taken_id_and_recent_lists_newest_first(store: RunStore) -> None:
    assert store.enqueue("run-a", "cli") is True
    assert store.enqueue("run-a", "cli") is False
    time.sleep(0.01)
    assert store.enqueue("run-b", "cli") is True
    assert [r.run_id for r in store.recent()] == ["run-b", "run-a"]
    assert store.close_queued("run-a", "run run-x is active") is True
    assert store.get("run-a").state == "skipped"  # type: ignore[union-attr]


def test_registry_for_picks_the_store_by_url(redis_url: str) -> None:
    import fakeredis
    import redis

    assert isinstance(registry_for("memory://", "p1").client, fakeredis.FakeRedis)
    real = registry_for(redis_url, "p1").client
    assert isinstance(real, redis.Redis) and not isinstance(real, fakeredis.FakeRedis)
