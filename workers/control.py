"""Operator controls, as plain functions: pause and resume all cleanup, abort one run.

The CLI calls these directly, and the control-queue tasks wrap them, so Flower's API and
``celery call`` can do the same. Each checks its arguments before it changes anything.
"""

from __future__ import annotations

import math
from typing import Any

import structlog

from workers.coordinator import check_run_id
from workers.exceptions import InvalidArgument, NotFound, RefusedError
from workers.runs import Pause, RunRecord, RunStore

log = structlog.get_logger("statesweep.control")


def _text(name: str, value: Any, limit: int = 300) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string, got {value!r}")
    return value.strip()[:limit]


def pause(registry: RunStore, *, by: str, reason: str = "",
          seconds: float | None = None) -> Pause:
    """Stop new chunks from starting (running ones finish) until resumed or *seconds* pass."""
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float)
                                or not math.isfinite(seconds) or seconds <= 0):
        raise InvalidArgument(f"the pause duration must be a positive number of seconds, "
                              f"got {seconds!r}")
    paused = registry.pause(_text("by", by), _text("reason", reason), seconds)
    log.info("cleanup_paused", by=paused.by, reason=paused.reason,
                until=paused.until or None)
    return paused


def resume(registry: RunStore, *, by: str) -> Pause:
    """Lift the pause; refuses when nothing is paused (a resume that did nothing is a mistake
    worth saying). The caller then pumps the active run so its parked chunks go out."""
    lifted = registry.resume()
    if lifted is None:
        raise RefusedError("cleanup is not paused; nothing to resume")
    log.info("cleanup_resumed", by=_text("by", by), paused_by=lifted.by)
    return lifted


def abort(registry: RunStore, run_id: Any, *, by: str) -> RunRecord:
    """End a queued or running run now ('aborted'): its lock is freed, its queued chunks delete
    nothing when they arrive, and its remaining rows wait for the next run (every DELETE
    re-checks the predicate, so nothing is lost by stopping part-way)."""
    run_id = check_run_id(run_id)
    record = registry.get(run_id)
    if record is None:
        raise NotFound(f"unknown run id {run_id!r}: no such cleanup run is recorded")
    if record.ended:  # the store's step answers 'aborted' for a run aborted before, too
        raise RefusedError(f"run {run_id} has already ended ({record.state}); nothing to abort")
    outcome = registry.abort(run_id, f"aborted by {_text('by', by) or 'someone'}")
    if outcome != "aborted":
        raise RefusedError(f"run {run_id} has already ended ({outcome}); nothing to abort")
    log.info("cleanup_run_aborted", run_id=run_id, by=by, rows=record.rows_deleted,
                chunks_done=record.chunks_done)
    ended = registry.get(run_id)
    assert ended is not None
    return ended
