"""The run-state machine's edges one at a time (docs/design.md, "Run state: one machine"), on a
real Redis and on memory://: each transition is one step guarded by the lock, and a step from a
run that no longer holds its lock is refused, logged and never applied. The regressions the
state machine test (test_run_state_machine.py) found are here as plain tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.cleanup_runs import id_plan, start_plan
from workers.planners import ChunkRange
from workers.runs import RUN_RETENTION_SECONDS, Gate, RunStore, Window
from workers.settings import Settings

pytestmark = pytest.mark.integration

KW: dict[str, Any] = {"lock_ttl": 3600, "window": 2, "resend_after": 3600.0, "gate": Gate()}


def state(store: RunStore, run_id: str) -> dict[str, str]:
    return dict(store.client.hgetall(f"{store.prefix}:run:{run_id}"))


def window_of(store: RunStore, run_id: str) -> dict[str, str]:
    return dict(store.client.hgetall(f"{store.prefix}:run:{run_id}:inflight"))


def test_queued_to_planning_to_running_to_finishing_to_finished(store: RunStore) -> None:
    assert store.enqueue("r1", "cli")
    assert (store.get("r1") or pytest.fail("none")).phase == "queued"
    taken = store.take("r1", 60, "delivery-1", source="cli")
    assert (taken.outcome, taken.detail) == ("taken", "queued")
    assert (store.get("r1") or pytest.fail("none")).phase == "planning"
    started = store.start("r1", id_plan(3), cutoff="2026-01-01T00:00:00+00:00", batch_size=10,
                          source="cli", **{**KW, "window": 2})
    assert isinstance(started, Window) and [n for n, _ in started.chunks] == [1, 2]
    assert (store.get("r1") or pytest.fail("none")).phase == "running"
    counted, w = store.finish_chunk("r1", 1, "ids", 5, 10, **KW)
    assert counted and [n for n, _ in w.chunks] == [3]  # the last chunk cut: finishing
    assert (store.get("r1") or pytest.fail("none")).phase == "finishing"
    store.finish_chunk("r1", 2, "ids", 5, 10, **KW)
    _, last = store.finish_chunk("r1", 3, "ids", 5, 10, **KW)
    assert last.finished is not None and last.finished.phase == "finished"
    assert store.active_run() is None
    # Each of the run's keys expires, the list of runs too (the exporter's counters are kept).
    for key in store.client.scan_iter(match=f"{store.prefix}:*"):
        if not key.endswith(":metrics"):
            assert 0 < store.client.ttl(key) <= RUN_RETENTION_SECONDS, key


def test_a_run_whose_lock_lapsed_is_refused_every_step_and_says_so(store: RunStore) -> None:
    """Nobody took the lapsed lock yet: the run's chunks, its pump, its cuts and shrinks change
    nothing (it used to go on, with a second run free to start beside it)."""
    start_plan(store, "r1", id_plan(4), window=2)
    before, inflight = state(store, "r1"), window_of(store, "r1")
    store.client.delete(f"{store.prefix}:lock")  # its TTL ran out
    status, detail = store.begin_chunk("r1", 1, ChunkRange("ids", 1, 11), Gate())
    assert (status, detail) == ("lost", [""])
    counted, w = store.finish_chunk("r1", 1, "ids", 10, 10, **KW)
    assert (counted, w.lost, w.chunks) == (False, True, [])
    assert store.pump("r1", "ids", **KW) == Window(lost=True)
    assert store.cut("r1", "21", ChunkRange("walk", 21, 31), "31", 9) == -2
    store.shrink("r1")
    assert store.renew("r1", 3600) is False
    assert state(store, "r1") == before and window_of(store, "r1") == inflight
    assert store.active_run() is None


def test_the_pump_of_a_run_that_lost_its_lock_logs_it_and_sends_nothing(
        store: RunStore, make_settings: Callable[..., Settings], sqlite_url: str) -> None:
    from tests.conftest import create_schema
    from workers.window import Sender

    engine, tables = create_schema(sqlite_url)
    sent: list[object] = []
    sender = Sender(make_settings(database_url=sqlite_url), engine, tables, store,
                    lambda *m: sent.append(m))
    start_plan(store, "r1", id_plan(4), window=2, resend_after=0.0)
    store.client.delete(f"{store.prefix}:lock")
    with capture_logs() as logs:
        record, w = sender.pump("r1")
    assert w.lost and not sent and record is not None and record.state == "running"
    [lost] = [e for e in logs if e["event"] == "cleanup_run_lock_lost"]
    assert (lost["run_id"], lost["step"], lost["holder"], lost["log_level"]) == (
        "r1", "pump", "", "warning")
    engine.dispose()


def test_shrinking_a_run_that_is_not_recorded_makes_no_key(store: RunStore) -> None:
    """A lock timeout's SHRINK for a run id whose record expired used to HSET a record
    without a TTL, kept forever."""
    store.shrink("gone")
    assert list(store.client.scan_iter(match=f"{store.prefix}:*")) == []


def test_a_failed_run_drops_its_window(store: RunStore) -> None:
    start_plan(store, "r1", id_plan(4), window=2)
    store.client.delete(f"{store.prefix}:lock")
    assert store.fail("r1", "its own error", started=True) == "failed"
    assert window_of(store, "r1") == {}


def test_a_delivery_finds_an_ended_run_or_a_pause_without_taking_the_lock(
        store: RunStore) -> None:
    start_plan(store, "r1", id_plan(1), window=2)
    store.finish_chunk("r1", 1, "ids", 1, 10, **KW)
    assert store.take("r1", 60, "t").outcome == "ended"
    store.pause("me", "", None)
    taken = store.take("r2", 60, "t")
    assert (taken.outcome, taken.detail) == ("gated", "paused")
    assert store.take("r3", 60, "t", external="outside active hours").outcome == "gated"
    assert store.active_run() is None and store.get("r2") is None


def test_a_chunk_failed_for_good_ends_the_run_failed_once_its_window_drains(
        store: RunStore) -> None:
    start_plan(store, "r1", id_plan(2), window=2)
    store.finish_chunk("r1", 1, "ids", 0, 0, **{**KW, "resend_after": 0.0},
                       error="chunk 1 failed: boom")
    assert (store.get("r1") or pytest.fail("none")).phase == "finishing"
    _, last = store.finish_chunk("r1", 2, "ids", 5, 10, **KW)
    assert last.finished is not None and last.finished.state == "failed"
    assert "chunk 1 failed" in last.finished.error and store.active_run() is None
