"""Following a cleanup run on stderr: chunks done/planned, rows deleted, rows/s and an ETA.

On a terminal one line redraws in place; into a file or pipe a plain line is written every few
seconds, so logs of a cron job stay readable. Data never goes here: summaries go to stdout.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import IO

from workers.exceptions import StatesweepError
from workers.runs import RunRecord, RunRegistry

BAR_WIDTH = 24
POLL_SECONDS = 0.5
TTY_REDRAW_SECONDS = 0.1
LOG_LINE_SECONDS = 5.0


class FollowInterrupted(StatesweepError):
    """Ctrl-C while following a run or task: it goes on, only the following stops."""

    @classmethod
    def run(cls, run_id: str) -> FollowInterrupted:
        return cls(f"stopped following run {run_id}; the run goes on. "
                   f"Follow it again with: statesweep status {run_id} --follow")


@dataclass(frozen=True)
class Snapshot:
    """Progress of a run at one moment; totals may be estimates while it is still planning."""

    chunks_done: int
    chunks_total: int
    rows_deleted: int
    rows_expected: int
    seconds: float
    planning: bool = False

    @classmethod
    def of(cls, record: RunRecord) -> Snapshot:
        return cls(record.chunks_done, record.chunks_planned, record.rows_deleted,
                   record.expected_rows, record.duration,
                   planning=record.state == "planning")

    @property
    def rate(self) -> float:
        return self.rows_deleted / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta(self) -> float | None:
        left = self.rows_expected - self.rows_deleted
        if self.planning or self.rate <= 0:
            return None
        return max(0.0, left / self.rate)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def render(snap: Snapshot) -> str:
    total = max(snap.chunks_total, snap.chunks_done)
    if total == 0:
        filled = 0 if snap.planning else BAR_WIDTH
    else:
        filled = BAR_WIDTH * snap.chunks_done // total
    plus = "+" if snap.planning else ""
    return (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
            f"{snap.chunks_done}/{total}{plus} chunks  "
            f"{snap.rows_deleted:,} rows  {snap.rate:,.0f} rows/s  "
            f"ETA {format_seconds(snap.eta)}"
            + ("  (planning)" if snap.planning else ""))


class ProgressBar:
    """One progress line on stderr (or *stream*), redrawn in place on a terminal."""

    def __init__(self, label: str, stream: IO[str] | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._last = 0.0
        self._width = 0
        self._open = False

    def update(self, snap: Snapshot, *, force: bool = False) -> None:
        now = time.monotonic()
        every = TTY_REDRAW_SECONDS if self.tty else LOG_LINE_SECONDS
        if not force and now - self._last < every:
            return
        self._last = now
        line = f"{self.label} {render(snap)}"
        if self.tty:
            pad = " " * max(0, self._width - len(line))
            self.stream.write(f"\r{line}{pad}")
            self._width = len(line)
            self._open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, snap: Snapshot | None = None) -> None:
        if snap is not None:
            self.update(snap, force=True)
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def follow_run(registry: RunRegistry, run_id: str, bar: ProgressBar,
               *, poll: float = POLL_SECONDS) -> RunRecord:
    """Poll the run store until *run_id* is finished or failed, drawing progress as it goes.

    Ctrl-C raises FollowInterrupted; the run itself is not touched.
    """
    try:
        while True:
            record = registry.get(run_id)
            if record is None:
                raise StatesweepError(f"run {run_id} vanished from the run store")
            if record.state in ("finished", "failed"):
                bar.close(Snapshot.of(record))
                return record
            bar.update(Snapshot.of(record))
            time.sleep(poll)
    except KeyboardInterrupt:
        bar.close()
        raise FollowInterrupted.run(run_id) from None
