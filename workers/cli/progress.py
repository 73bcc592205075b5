"""Following a cleanup run on stderr: chunks done/planned, rows deleted, rows/s and an ETA.

The bar is tqdm's. On a terminal one line redraws in place and log lines go above it; into a
file or pipe a plain line is written every few seconds, so logs of a cron job stay readable.
A run still cutting chunks with no count of its rows (walk) says so instead of a total and an
ETA it does not have. Data never goes here: summaries go to stdout.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

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
    """Progress of a run at one moment. ``planning``: chunks are still being cut and nothing
    says how many there will be (walk), so there is no total and no ETA; ``estimate``: the
    total is the plan's estimate (the rest of the plan at the current chunk size)."""

    chunks_done: int
    chunks_total: int
    rows_deleted: int
    rows_expected: int
    seconds: float
    planning: bool = False
    note: str = ""  # queued, held or stalled: said instead of an ETA that stands still
    chunks_cut: int = 0
    estimate: bool = False
    ended: bool = False

    @classmethod
    def of(cls, record: RunRecord, note: str = "") -> Snapshot:
        cutting = record.state == "running" and not record.planning_done
        return cls(record.chunks_done, record.estimated_chunks, record.rows_deleted,
                   record.expected_rows, record.duration,
                   # The coordinator choosing a plan, or a plan cut as it goes with no count
                   # of its rows (walk): its "estimate" is the id span over the batch size.
                   planning=record.state == "planning" or (cutting and record.expected_rows <= 0),
                   note=note or _state_note(record), chunks_cut=record.chunks_planned,
                   estimate=cutting, ended=record.ended)

    @property
    def rate(self) -> float:
        return self.rows_deleted / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far; None when unknown (planning, no rate yet, or more
        rows deleted than the estimate said: a 0.0s that stands still would be a guess)."""
        left = self.rows_expected - self.rows_deleted
        if self.planning or self.ended or self.rate <= 0 or left <= 0:
            return None
        return left / self.rate


# A chunk retry this recent is news: the run is waiting on it.
RETRY_NEWS_SECONDS = 60.0


def _state_note(record: RunRecord, now: float | None = None) -> str:
    if record.state == "queued":
        return "queued: waiting for a worker to take the coordinator"
    now = time.time() if now is None else now
    if not record.ended and record.retry_error and now - record.retry_at <= RETRY_NEWS_SECONDS:
        return (f"chunks retrying {record.retry_error} ({record.retries:,} "
                f"{'retry' if record.retries == 1 else 'retries'} so far)")
    return ""


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


#: tqdm's meter: percentage, bar, chunks done of the total ('+' while it is an estimate), then
#: rows, rate and ETA. In a log the bar is BAR_WIDTH '#' and '.'; on a terminal it fills the
#: width left.
METER = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{plus} chunks  {tail}"


def render(snap: Snapshot, width: int | None = None) -> str:
    """The bar's text for *snap*: tqdm's meter for a run whose chunks can be counted, words for
    one that is queued, held, stalled or still cutting an unknown number of chunks. *width*:
    the terminal's columns (None: a log line, a fixed bar of '#' and '.')."""
    from tqdm import tqdm

    rows = f"{snap.rows_deleted:,} rows  {snap.rate:,.0f} rows/s"
    if snap.planning:
        # No total and no ETA: only what is certain so far.
        cut = (f"{snap.chunks_cut:,} chunks cut so far, {snap.chunks_done:,} done"
               if snap.chunks_cut else "choosing the chunks")
        return f"planning: {cut}  {rows}" + (f"  {snap.note}" if snap.note else "")
    total = max(snap.chunks_total, snap.chunks_done)
    if snap.ended:
        tail = f"{rows}  in {format_seconds(snap.seconds)}"
    elif snap.note:
        tail = f"{rows}  {snap.note}"
    else:
        tail = f"{rows}  ETA {format_seconds(snap.eta)}"
    if total == 0 and snap.ended:
        return f"nothing to delete: 0 chunks  {tail}"
    if total == 0 and snap.note:  # queued, or held before its first chunk: no bar to show
        return snap.note
    return tqdm.format_meter(
        snap.chunks_done, total, snap.seconds, ncols=width,
        bar_format=METER if width else METER.replace("{bar}", f"{{bar:{BAR_WIDTH}}}"),
        ascii=None if width else ".#", plus="+" if snap.estimate else "", tail=tail)


class ProgressBar:
    """The run's progress on stderr (or *stream*). On a terminal, a tqdm bar redrawn in place,
    with log lines written above it (tqdm.write) while it is open, so they never tear it;
    into a file or pipe a plain line every few seconds, so a cron job's log stays readable."""

    def __init__(self, label: str, stream: IO[str] | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._last = 0.0
        self._bar: Any = None
        self._logs: Any = None

    def update(self, snap: Snapshot, *, force: bool = False) -> None:
        now = time.monotonic()
        every = TTY_REDRAW_SECONDS if self.tty else LOG_LINE_SECONDS
        if not force and now - self._last < every:
            return
        self._last = now
        if not self.tty:
            self.stream.write(f"{self.label} {render(snap)}\n")
            self.stream.flush()
            return
        if self._bar is None:
            self._open()
        # Read each time: the terminal may be resized (a pty that reports no size: 80).
        columns = shutil.get_terminal_size().columns
        self._bar.ncols = columns
        text = render(snap, max(40, columns - len(self.label) - 2))
        self._bar.set_description_str(f"{self.label} {text}", refresh=True)

    def _open(self) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        class Bar(tqdm):  # type: ignore[type-arg]
            monitor_interval = 0  # no monitor thread: this bar is redrawn by its follower

        # tqdm draws the line; the text is render()'s, so a terminal and a log say the same.
        size = shutil.get_terminal_size()  # a pty that reports no size: 80x24, not hidden
        self._bar = Bar(file=self.stream, bar_format="{desc}", leave=True, mininterval=0,
                        ncols=size.columns, nrows=size.lines)
        # The console log handler (structlog's formatter) writes through tqdm.write while the
        # bar is open: each line above the bar, the bar redrawn under it.
        self._logs = logging_redirect_tqdm(tqdm_class=Bar)
        self._logs.__enter__()

    def close(self, snap: Snapshot | None = None) -> None:
        if snap is not None:
            self.update(snap, force=True)
        if self._bar is not None:
            self._bar.close()
            self._logs.__exit__(None, None, None)
            self._bar = self._logs = None


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
        raise FollowInterrupted.run(run_id) from None
    finally:
        bar.close()  # on any way out: the terminal's line ends, log lines go straight again
