"""Following a cleanup run on stderr: chunks done/planned, rows deleted, rows/s and an ETA.

On a terminal one line redraws in place; into a file or pipe a plain line is written every few
seconds, so logs of a cron job stay readable. Data never goes here: summaries go to stdout.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from workers.cli.watch import Watch
from workers.exceptions import StatesweepError
from workers.runs import RunRecord, RunRegistry
from workers.settings import Settings

BAR_WIDTH = 24
POLL_SECONDS = 0.5
#: The first poll waits this long; each next one 1.5 times longer, up to the poll interval. A
#: small run ends within tens of milliseconds of its pickup, and a fixed 0.5 s sleep was most of
#: an empty `cleanup --wait`; a long run settles at the interval after a dozen cheap reads.
FIRST_POLL_SECONDS = 0.01
TTY_REDRAW_SECONDS = 0.1
LOG_LINE_SECONDS = 5.0


def poll_delays(cap: float, first: float = FIRST_POLL_SECONDS) -> Iterator[float]:
    """Sleeps between polls: *first*, then 1.5 times the last, never over *cap*."""
    delay = min(first, cap)
    while True:
        yield delay
        delay = min(cap, delay * 1.5)


class FollowInterrupted(StatesweepError):
    """Ctrl-C while following a run or task: it goes on, only the following stops."""

    @classmethod
    def run(cls, run_id: str) -> FollowInterrupted:
        return cls(f"stopped following run {run_id}; the run goes on. "
                   f"Follow it again with: statesweep status {run_id} --follow")


class RunStuck(StatesweepError):
    """A followed run cannot finish as things stand (no worker takes it, its chunks stay
    outstanding, or its record is gone): following stops, saying so, rather than hang."""


#: How long following waits for a worker to take a queued run's coordinator.
PICKUP_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class Snapshot:
    """Progress of a run at one moment; totals may be estimates while it is still planning."""

    chunks_done: int
    chunks_total: int
    rows_deleted: int
    rows_expected: int
    seconds: float
    planning: bool = False
    note: str = ""  # queued, held or stalled: said instead of an ETA that stands still

    @classmethod
    def of(cls, record: RunRecord, note: str = "") -> Snapshot:
        return cls(record.chunks_done, record.estimated_chunks, record.rows_deleted,
                   record.expected_rows, record.duration,
                   planning=record.state == "running" and not record.planning_done, note=note)

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
            + (snap.note if snap.note else f"ETA {format_seconds(snap.eta)}"
               + ("  (planning)" if snap.planning else "")))


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
               *, settings: Settings | None = None, poll: float = POLL_SECONDS,
               pickup_timeout: float = PICKUP_TIMEOUT_SECONDS,
               watch: Watch | None = None) -> RunRecord:
    """Read the run store until *run_id* has ended (finished, failed, aborted, skipped),
    drawing progress as it goes; with *settings*, a queued, held or stalled run says so.
    Between reads it waits on *watch* (workers.cli.watch): a change of the run ends the wait
    at once; without one, or on memory://, it sleeps, at most *poll* seconds.

    Never hangs on a run that cannot finish: RunStuck when its record disappears, when it stays
    queued past *pickup_timeout*, or when it stays stalled past the time the pump needs to have
    re-sent its chunks. Ctrl-C raises FollowInterrupted; the run itself is not touched.
    """
    from workers.cli import stalls

    watch = watch or Watch()
    delays = poll_delays(poll)
    try:
        while True:
            record = registry.get(run_id)
            if record is None:
                raise RunStuck(f"run {run_id} is no longer in the run store (expired or "
                               "removed), so nothing will report its end; `statesweep status` "
                               "lists the runs it has")
            if record.ended:
                bar.close(Snapshot.of(record))
                return record
            note = ""
            if settings is not None:
                now = stalls.condition(settings, registry, record)
                note = now.note()
                if now.state == "queued" and now.queued_seconds >= pickup_timeout:
                    bar.close()
                    raise RunStuck(
                        f"run {run_id} is still queued after {now.queued_seconds:.0f}s: no "
                        f"worker has taken its coordinator from {settings.control_queue} "
                        "(`statesweep doctor` lists workers). It runs when one does; drop it "
                        f"with: statesweep abort {run_id}")
                if now.stalled and now.idle_seconds >= stalls.give_up_after(settings):
                    bar.close(Snapshot.of(record, note))
                    raise RunStuck(
                        f"run {run_id} is stalled: no chunk finished for "
                        f"{now.idle_seconds:.0f}s, {len(now.outstanding)} outstanding, and "
                        "the pump's re-sends were not taken (are workers consuming "
                        f"{settings.chunk_queue}? `statesweep doctor`). It goes on if workers "
                        f"return; `statesweep status {run_id}` shows it, "
                        f"`statesweep abort {run_id}` ends it")
            bar.update(Snapshot.of(record, note))
            watch.wait(next(delays))
    except KeyboardInterrupt:
        bar.close()
        raise FollowInterrupted.run(run_id) from None
