"""Whether a run is moving: queued, held, stalled or progressing, read from the run store.

A run is **stalled** when it is running, nothing holds it, and no chunk has finished for longer
than ``stalled_after``: typically a worker died with chunks unacknowledged. Its outstanding
chunks come from the run's in-flight window; the pump (beat, every
STATESWEEP_PUMP_INTERVAL_SECONDS) sends a chunk again once it was sent ``resend_after`` ago,
so each one's re-send time is known. `status` and `cleanup --wait` report this instead of an
ETA that stands still.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

from workers.planners.base import EXPIRY, ChunkRange
from workers.runs import RunRecord, RunStore
from workers.settings import Settings

#: No finished chunk for this long (or the chunk hard time limit, if shorter: no chunk can run
#: longer) with chunks outstanding is a stall, not a slow chunk.
STALLED_AFTER_SECONDS = 60.0


def stalled_after(settings: Settings) -> float:
    limit = float(settings.chunk_time_limit)
    return min(STALLED_AFTER_SECONDS, limit) if limit > 0 else STALLED_AFTER_SECONDS


def resend_after(settings: Settings) -> float:
    """workers.window's resend period, imported only for a run with chunks in its window: the
    window imports SQLAlchemy, which an empty `cleanup --wait` never needs."""
    from workers.window import resend_after as window_resend_after

    return window_resend_after(settings)


def give_up_after(settings: Settings) -> float:
    """How long `--wait` follows a stalled run: long enough for the pump to have re-sent every
    outstanding chunk and for one of them to finish. Past it no worker is taking chunks."""
    return stalled_after(settings) + resend_after(settings) + 3 * settings.pump_interval_seconds


def iso(ts: float) -> str | None:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat() if ts else None


@dataclass(frozen=True)
class Outstanding:
    """One chunk of the window: sent and not finished, or parked by a hold."""

    chunk: int
    kind: str
    lo: int | str
    hi: int | str | None
    sent_at: float
    parked: bool
    age: float
    resend_at: float  # 0 for a parked chunk: it goes out when the hold lifts

    def as_dict(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "kind": self.kind, "lo": self.lo, "hi": self.hi,
                "state": "parked" if self.parked else "sent", "sent_at": iso(self.sent_at),
                "age_seconds": round(self.age, 1), "resend_at": iso(self.resend_at)}

    def describe(self, now: float | None = None) -> str:
        hi = "end" if self.hi is None else str(self.hi)
        what = f"chunk {self.chunk} {self.kind} [{self.lo}, {hi})"
        if self.parked:
            return f"{what} parked {self.age:.0f}s ago; sent again when the hold lifts"
        if self.resend_at <= (time.time() if now is None else now):
            return f"{what} sent {self.age:.0f}s ago; due: the next pump or trigger re-sends it"
        when = dt.datetime.fromtimestamp(self.resend_at, dt.UTC).strftime("%H:%M:%SZ")
        return f"{what} sent {self.age:.0f}s ago; re-sent by the first pump after {when}"


@dataclass(frozen=True)
class Condition:
    """What a run is doing now, beyond its state."""

    state: str
    stalled: bool = False
    idle_seconds: float = 0.0  # since the last finished chunk (or the window opened)
    held: str = ""
    held_since: float = 0.0
    queued_seconds: float = 0.0
    outstanding: list[Outstanding] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "stalled": self.stalled,
                "idle_seconds": round(self.idle_seconds, 1), "held": self.held,
                "held_since": iso(self.held_since),
                "queued_seconds": round(self.queued_seconds, 1),
                "outstanding": [o.as_dict() for o in self.outstanding]}

    def note(self) -> str:
        """One line for the progress bar or `status`; empty when the run is simply moving."""
        if self.state == "queued":
            return f"queued {self.queued_seconds:.0f}s: no worker has taken the coordinator yet"
        if self.held:
            since = f" since {iso(self.held_since)}" if self.held_since else ""
            return f"held: {self.held}{since}"
        if self.stalled:
            sent = [o for o in self.outstanding if not o.parked]
            return (f"STALLED: no chunk finished for {self.idle_seconds:.0f}s; "
                    f"{len(self.outstanding)} outstanding"
                    + (f", the oldest sent {max(o.age for o in sent):.0f}s ago" if sent else ""))
        return ""


def _bounds(rng: ChunkRange) -> tuple[int | str, int | str | None]:
    """A range's bounds as an operator reads them: an expiry key as its timestamp and id."""
    if rng.kind != EXPIRY:
        return rng.lo, rng.hi
    from workers.planners.expiry import describe_key

    return (describe_key(rng.lo, rng.lo_id),
            None if rng.hi is None else describe_key(rng.hi, rng.hi_id))


def condition(settings: Settings, registry: RunStore, record: RunRecord,
              now: float | None = None) -> Condition:
    now = time.time() if now is None else now
    if record.state == "queued":
        return Condition("queued", queued_seconds=max(0.0, now - record.started_at))
    if record.state != "running":
        return Condition(record.state)
    window = registry.inflight(record.run_id)
    again = resend_after(settings) if window else 0.0
    outstanding = [Outstanding(n, rng.kind, *_bounds(rng), sent, parked, max(0.0, now - sent),
                               0.0 if parked else sent + again)
                   for n, rng, sent, parked in window]
    last = (record.last_progress_at or record.window_started_at or record.planned_at
            or record.started_at)
    idle = max(0.0, now - last) if last else 0.0
    if record.held:
        return Condition("running", idle_seconds=idle, held=record.held,
                         held_since=record.held_since, outstanding=outstanding)
    return Condition("running", stalled=idle >= stalled_after(settings), idle_seconds=idle,
                     outstanding=outstanding)
