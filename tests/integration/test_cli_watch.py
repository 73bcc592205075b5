"""Following a run wakes on the run's own changes (workers.cli.watch), on a real Redis: the
record and its window wake a wait; another run's keys do not; memory:// falls back to sleeping."""

from __future__ import annotations

import threading

from tests.services import unique
from workers.cli.watch import RedisWatch, Watch, run_key_prefix, watch_run
from workers.runs import registry_for


def test_a_change_of_the_run_wakes_the_wait_and_another_run_does_not(redis_url: str) -> None:
    prefix = f"sw:{unique('w')}"
    store = registry_for(redis_url, prefix)
    run_id, other = "20261204T000000Z-aaaaaaaa", "20261204T000000Z-bbbbbbbb"
    with watch_run(redis_url, prefix, run_id) as watch:
        assert isinstance(watch, RedisWatch) and watch.blocking
        assert watch.wait(0.2) is False  # nothing changed
        store.enqueue(other, "test")
        assert watch.wait(0.2) is False  # another run's record is not this run's
        store.enqueue(run_id, "test")
        assert watch.wait(30) is True
        store.client.hset(f"{run_key_prefix(prefix, run_id)}:inflight", "1", "0:10|0|s")
        assert watch.wait(30) is True  # the window is the run's too
        assert watch.wait(0.2) is False  # one wake per burst: nothing is left queued
        # A change made from another process while waiting ends the wait.
        closer = threading.Timer(0.3, store.close_queued, (run_id, "test"))
        closer.start()
        assert watch.wait(30) is True
        closer.join()
        record = store.get(run_id)
        assert record is not None and record.state == "skipped"
    store.client.delete(*store.client.keys(f"{prefix}:*"))


def test_memory_runs_and_a_closed_watch_fall_back_to_sleeping(redis_url: str) -> None:
    assert type(watch_run("memory://", "sw", "r1")) is Watch
    watch = watch_run(redis_url, f"sw:{unique('w')}", "r1")
    watch.close()
    assert watch.wait(0.01) is True  # closed: it sleeps, it does not reconnect untracked
    assert watch.wait(0.01) is True
