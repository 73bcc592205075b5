"""The demo's summary lines read as sentences: one chunk, one batch; never "1 batches"."""

from __future__ import annotations

from workers.cli.demo import DemoResult, render


def _result(chunks: int, batches: int) -> DemoResult:
    run = {"run_id": "r1", "state": "finished", "rows_deleted": 55_000, "chunks_done": chunks,
           "duration": 0.5, "rows_per_second": 110_000.0, "cutoff": "2026-12-01T10:00:00+00:00"}
    return DemoResult(run=run, orphans={"rows": 170, "batches": batches}, expired_left=0,
                      live_rows_lost=0, orphaned_asset_state_left=0, live_asset_state_lost=0)


def test_one_chunk_and_one_batch_are_singular() -> None:
    lines = render(_result(1, 1)).splitlines()
    assert " deleted in 1 chunk, " in lines[0]
    assert lines[1] == "orphaned asset state: 170 rows deleted in 1 batch"


def test_several_are_plural() -> None:
    lines = render(_result(6, 2)).splitlines()
    assert " deleted in 6 chunks, " in lines[0]
    assert lines[1] == "orphaned asset state: 170 rows deleted in 2 batches"

