"""What the progress bar says at each state of a run (workers.cli.progress.render), and that log
lines written while the bar is on a terminal go above it instead of through it (issue 22: a
bar right from the first second for every planner, logs that do not tear it)."""

from __future__ import annotations

import io
import logging
import re

import pytest
import structlog

from workers.cli.progress import BAR_WIDTH, ProgressBar, Snapshot, render
from workers.logs import configure_logging
from workers.runs import RunRecord


def test_a_walk_run_still_cutting_says_planning_with_no_total_and_no_eta() -> None:
    """The walk planner has no count of its rows: its "estimate" is the id span over the batch
    size (issue 22 item 7 showed `0/1901+ chunks, planned 0, ETA 0.0s`)."""
    record = RunRecord("r", "running", kind="walk", start=1, end="1900001", cursor="60001",
                       size=1000, chunks_planned=12, chunks_done=10, rows_deleted=10_000,
                       expected_rows=0, started_at=1.0, planning_done=False)
    snap = Snapshot.of(record)
    assert snap.planning and snap.eta is None
    text = render(snap)
    assert text.startswith("planning: 12 chunks cut so far, 10 done  10,000 rows")
    assert "ETA" not in text and "%" not in text and "/1901" not in text


def test_a_run_choosing_its_plan_says_so_from_the_first_second() -> None:
    assert render(Snapshot.of(RunRecord("r", "planning", started_at=1.0))).startswith(
        "planning: choosing the chunks  0 rows")
    assert render(Snapshot(0, 0, 0, 0, 0.2, planning=True)) == (
        "planning: choosing the chunks  0 rows  0 rows/s")


def test_a_queued_run_says_it_waits_for_a_worker() -> None:
    text = render(Snapshot.of(RunRecord("r", "queued", started_at=1.0)))
    assert text == "queued: waiting for a worker to take the coordinator"


def test_a_counted_run_shows_tqdm_s_bar_an_estimated_total_and_an_eta() -> None:
    snap = Snapshot(12, 40, 120_000, 400_000, 3.0, estimate=True)
    assert render(snap) == (" 30%|#######.................| 12/40+ chunks  120,000 rows  "
                            "40,000 rows/s  ETA 7.0s")
    # The expiry planner counts its rows: a bar and an ETA while chunks are still cut.
    record = RunRecord("r", "running", kind="expiry", size=1000, chunks_planned=5,
                       chunks_done=2, rows_deleted=2000, expected_rows=10_000,
                       planning_done=False, started_at=1.0)
    assert not Snapshot.of(record).planning and Snapshot.of(record).estimate


def test_no_eta_of_zero_when_more_rows_went_than_the_estimate_said() -> None:
    text = render(Snapshot(5, 10, 6_000, 5_000, 2.0))
    assert "ETA ?" in text and "0.0s" not in text


def test_a_held_or_stalled_run_says_why_instead_of_an_eta() -> None:
    text = render(Snapshot(3, 10, 300, 1000, 60.0, note="STALLED: no chunk finished for 60s"))
    assert text.endswith("300 rows  5 rows/s  STALLED: no chunk finished for 60s")
    assert "ETA" not in text


def test_an_ended_run_shows_the_full_bar_and_its_time() -> None:
    assert render(Snapshot(4, 4, 11_000, 11_000, 2.0, ended=True)) == (
        f"100%|{'#' * BAR_WIDTH}| 4/4 chunks  11,000 rows  5,500 rows/s  in 2.0s")
    assert render(Snapshot(0, 0, 0, 0, 0.05, ended=True)) == (
        "nothing to delete: 0 chunks  0 rows  0 rows/s  in 0.1s")


def test_on_a_terminal_the_bar_fills_the_width_it_is_given() -> None:
    for width in (60, 100):
        text = render(Snapshot(5, 10, 500, 1000, 2.0), width)
        assert len(text) == width and "5/10 chunks" in text and "#" not in text


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_go_above_the_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    configure_logging("console", "INFO", force=True)  # its handler writes to this stderr
    try:
        bar = ProgressBar("run r1")
        bar.update(Snapshot(1, 4, 100, 400, 1.0), force=True)
        structlog.get_logger("statesweep.chunk").info("chunk_deleted", chunk=2, rows=100)
        bar.update(Snapshot(2, 4, 200, 400, 2.0), force=True)
        bar.close(Snapshot(4, 4, 400, 400, 3.0, ended=True))
    finally:
        logging.getLogger().handlers.clear()
    out = screen.getvalue()
    lines = out.split("\n")
    logged = [line for line in lines if "chunk_deleted" in line]
    assert len(logged) == 1
    # The bar was cleared before the log line: what the terminal shows of that line (after its
    # last carriage return) is the log line alone, from its first column.
    shown = logged[0].rsplit("\r", 1)[-1]
    assert re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z \[info\s*\] chunk_deleted", shown), shown
    # The bar was drawn before it, redrawn after it, and left at its end.
    assert "run r1  25%|" in lines[0]
    after = "\n".join(lines[lines.index(logged[0]) + 1:])
    assert "run r1  50%|" in after and "run r1 100%|" in after
    assert out.endswith("in 3.0s\n")


def test_into_a_file_the_bar_is_a_line_from_the_start_then_every_few_seconds() -> None:
    log = io.StringIO()
    bar = ProgressBar("run r1", stream=log)
    bar.update(Snapshot(0, 0, 0, 0, 0.0, planning=True))
    bar.update(Snapshot(1, 4, 100, 400, 0.5))  # within LOG_LINE_SECONDS: not written
    bar.close(Snapshot(4, 4, 400, 400, 3.0, ended=True))
    assert log.getvalue().splitlines() == [
        "run r1 planning: choosing the chunks  0 rows  0 rows/s",
        f"run r1 100%|{'#' * BAR_WIDTH}| 4/4 chunks  400 rows  133 rows/s  in 3.0s"]
