"""What the run store keeps besides runs, on real Redis and on memory://: orphan sweeps (updated
in place, expiring, the newest listed first) and the latest failed and beat triggers (bounded)."""

from __future__ import annotations

import pytest

from workers.runs import RECENT_TRIGGERS_KEPT, RUN_RETENTION_SECONDS, RunStore

pytestmark = pytest.mark.integration


def test_a_sweep_is_recorded_updated_listed_and_expires(store: RunStore) -> None:
    assert store.get_sweep("orphans-a") is None and store.recent_sweeps() == []
    store.record_sweep("orphans-a", "running", table="asset_state")
    started = store.get_sweep("orphans-a")
    assert started is not None and started["state"] == "running" and started["rows"] == 0
    store.record_sweep("orphans-a", "finished", rows=40, batches=2, seconds=0.25, error="")
    store.record_sweep("orphans-b", "failed", error="OperationalError: gone")
    done = store.get_sweep("orphans-a")
    assert done is not None
    assert (done["state"], done["rows"], done["batches"], done["seconds"], done["table"]) == (
        "finished", 40, 2, 0.25, "asset_state")
    assert done["started_at"] == started["started_at"]  # the first record's start is kept
    assert [s["sweep_id"] for s in store.recent_sweeps()] == ["orphans-b", "orphans-a"]
    assert store.recent_sweeps()[0]["error"] == "OperationalError: gone"
    ttl = store.client.ttl(f"{store.prefix}:sweep:orphans-a")
    assert 0 < ttl <= RUN_RETENTION_SECONDS


def test_failed_and_beat_triggers_are_kept_newest_first_and_bounded(store: RunStore) -> None:
    for i in range(RECENT_TRIGGERS_KEPT + 5):
        store.note_trigger("failed", f"r{i}", "beat", f"error {i}")
    store.note_trigger("started", "ok-run", "cli")
    failed = store.failed_triggers()
    assert len(failed) == RECENT_TRIGGERS_KEPT
    assert [f[1] for f in failed[:2]] == [f"r{RECENT_TRIGGERS_KEPT + 4}",
                                          f"r{RECENT_TRIGGERS_KEPT + 3}"]
    assert failed[0][2:] == ("beat", f"error {RECENT_TRIGGERS_KEPT + 4}")
    beats = store.beat_trigger_times()
    assert len(beats) == RECENT_TRIGGERS_KEPT and beats == sorted(beats, reverse=True)
    assert store.triggers()["started"][1:3] == ("ok-run", "cli")
