"""A chunk task that failed: counted in its run as failed, and logged as what it was.

Celery calls a chunk task's on_failure for errors it gave up on and for the hard time limit.
The limit also ends chunks whose DELETE had committed and been counted, while they sent the
next chunks to a broker that was down: not a failed chunk, and its run (rightly) counts no
failure. The log says what the run store counted, so ``chunk_failed`` errors and
``chunks_failed`` agree.
"""

from __future__ import annotations

import structlog

from workers.runs import Gate, RunRecord, RunStore

log = structlog.get_logger("statesweep.tasks")


def record_chunk_failure(registry: RunStore, run_id: str, number: int, kind: str, error: str,
                         *, lock_ttl: int, window: int, gate: Gate,
                         table: str) -> RunRecord | None:
    """Count chunk *number* of *run_id* as failed with *error*, unless the run counted it
    already, and log which it was: ``chunk_failed`` (ERROR) when this step counted it, a
    warning otherwise. Returns the run's record if this step ended the run."""
    try:
        counted, top_up = registry.finish_chunk(run_id, number, kind, 0, 0, lock_ttl=lock_ttl,
                                                window=window, resend_after=0, gate=gate,
                                                error=error, table=table)
    except Exception as exc:  # the run store is down too; the chunk stays in the window
        log.warning("chunk_failure_not_recorded", run_id=run_id, chunk=number, error=error,
                    store_error=type(exc).__name__,
                    note="not counted: the run store did not answer; the chunk stays in the "
                         "run's window and is sent again")
        return None
    if top_up.lost:
        log.warning("chunk_failure_not_counted", run_id=run_id, chunk=number, error=error,
                    note="the run no longer holds its lock; the next trigger ends it")
    elif counted:
        log.error("chunk_failed", run_id=run_id, chunk=number, error=error)
    else:
        log_interrupted_after_counted(run_id, number, error)
    return top_up.finished


def counted_already(registry: RunStore, run_id: str, number: int) -> bool:
    """Whether chunk *number* has left its run's window (counted, by this or another copy, or
    the run ended); False when the run store does not answer."""
    try:
        return registry.get(run_id) is not None and number not in {
            n for n, *_ in registry.inflight(run_id)}
    except Exception:
        return False


def log_interrupted_after_counted(run_id: str, number: int, error: str) -> None:
    log.warning("chunk_interrupted_after_counted", run_id=run_id, chunk=number, error=error,
                note="not a failed chunk: it was counted already (its DELETE committed, in this "
                     "or another copy); what was cut short came after it, such as sending the "
                     "next chunks, which the pump sends again")
