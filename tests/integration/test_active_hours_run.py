"""Active hours on a real PostgreSQL database, with the clock moved by the test: a run whose
window closes mid-run stops sending chunks and continues in the next window from where it
stopped (one plan, nothing re-planned, nothing lost); a trigger outside the window starts
nothing and says so."""

from __future__ import annotations

import datetime as dt
from collections import deque
from pathlib import Path

import pytest

from tests.conftest import create_schema, database_now
from tests.services import REDIS_URL, require, unique
from workers import window
from workers.chunk import check_chunk_args, run_chunk
from workers.coordinator import coordinate
from workers.planners import ChunkRange
from workers.runs import registry_for
from workers.seed import SeedSpec, expected_survivors, seed, task_state_rows
from workers.settings import Settings

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self, at: dt.datetime) -> None:
        self.at = at

    def __call__(self) -> dt.datetime:
        return self.at


def test_window_closing_mid_run_holds_it_and_the_next_window_finishes_it(
        pg_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    require("Redis", "127.0.0.1", 6379)
    engine, tables = create_schema(pg_url)
    spec = SeedSpec(rows=20_000)
    seed(engine, tables, spec, database_now(engine))
    settings = Settings.from_env({
        "STATESWEEP_DATABASE_URL": pg_url, "STATESWEEP_KEY_PREFIX": f"sw:{unique('hours')}",
        "STATESWEEP_ACTIVE_HOURS": "22:00-06:00", "STATESWEEP_MAX_CHUNKS_IN_FLIGHT": "2",
        "STATESWEEP_CLEANUP_BATCH_SIZE": "1000"})
    registry = registry_for(REDIS_URL, settings.key_prefix)
    clock = Clock(dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC))  # noon: outside
    monkeypatch.setattr(window, "utcnow", clock)
    queue: deque[tuple[str, int, ChunkRange, str]] = deque()

    def dispatch(run_id: str, number: int, rng: ChunkRange, cutoff: str) -> None:
        queue.append((run_id, number, rng, cutoff))

    def drain(limit: int) -> list[str]:
        statuses = []
        while queue and len(statuses) < limit:
            run_id, number, rng, cutoff = queue.popleft()
            args = check_chunk_args(run_id, number, rng.kind, rng.lo, rng.hi, cutoff)
            statuses.append(run_chunk(settings, engine, tables, registry, dispatch,
                                      args).status)
        return statuses

    outside = coordinate(settings, engine, tables, registry, dispatch, source="beat")
    assert outside.status == "outside_active_hours" and not queue
    assert registry.active_run() is None

    clock.at = dt.datetime(2026, 12, 1, 23, 0, tzinfo=dt.UTC)  # the window is open
    started = coordinate(settings, engine, tables, registry, dispatch, source="beat")
    assert started.status == "started"
    assert drain(5) == ["deleted"] * 5
    clock.at = dt.datetime(2026, 12, 2, 6, 0, tzinfo=dt.UTC)  # closes mid-run
    held = drain(10)
    record = registry.get(started.run_id)
    assert record is not None
    assert held == ["held"] * len(held) and held and not queue  # parked, not deleted
    assert (record.state, record.held) == ("running", "outside active hours 22:00-06:00 UTC")
    done_at_close = record.chunks_done
    # Beat's pump and triggers outside the window send nothing.
    assert window.Sender(settings, engine, tables, registry, dispatch).pump(
        started.run_id)[1].held and not queue

    clock.at = dt.datetime(2026, 12, 2, 22, 0, tzinfo=dt.UTC)  # the next window
    window.Sender(settings, engine, tables, registry, dispatch).pump(started.run_id)
    while queue:
        drain(100)
    record = registry.get(started.run_id)
    assert record is not None and record.state == "finished"
    assert done_at_close == 5 and record.chunks_done == record.chunks_planned > 5
    assert task_state_rows(engine, tables) == expected_survivors(spec)
    engine.dispose()
