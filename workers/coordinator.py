"""Planning a cleanup run: the coordinator, as a plain function the Celery task and the CLI call.

coordinate() takes the single-flight lock, fixes the cutoff from the database clock, asks the
planner for an arithmetic plan (probes, no row reads), writes the plan and cuts the first window
in one atomic step, and sends that window. Finished chunks send the rest (workers.window).

A trigger that finds another run active tops up that run's window instead: it sends again any
chunk whose message was lost and any chunk parked by a hold, and restarts a run-time budget.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import Engine

from workers import cleanup, planners
from workers.cleanup import EVERYTHING
from workers.exceptions import InvalidArgument, StatesweepError
from workers.run_ids import RUN_ID, check_run_id, new_run_id  # noqa: F401 - the one format
from workers.runs import BEAT_EVERY_SECONDS, Gate, RunRecord, RunStore
from workers.schema import Tables
from workers.selection import Selection
from workers.settings import Settings, check_batch_size_value
from workers.store import load_backend
from workers.window import Dispatch, Sender, gate, resend_after

log = structlog.get_logger("statesweep.coordinator")

def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise InvalidArgument(f"batch_size must be a whole number, got {batch_size!r}")
    try:  # the one bound settings and --batch-size use too
        return check_batch_size_value(batch_size, "batch_size")
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def batch_size_for(settings: Settings, batch_size: Any = None) -> int:
    """The batch size of one run or sweep: the argument if given, else the setting; checked."""
    return check_batch_size(settings.cleanup_batch_size if batch_size is None else batch_size)


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    # started | finished | skipped | resumed | paused | outside_active_hours | custom_backend
    status: str
    cutoff: str = ""
    chunks: int = 0  # chunks sent by this trigger
    expected_rows: int = 0
    active_run_id: str = ""
    planner: str = ""
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class LockLost(StatesweepError):
    """The single-flight lock expired or passed to another run before the plan was written."""


def coordinate(settings: Settings, engine: Engine, tables: Tables, registry: RunStore,
               dispatch: Dispatch, *, run_id: str | None = None, batch_size: int | None = None,
               source: str = "beat", selection: Selection = EVERYTHING,
               top_up_active: bool = True, database: str = "", request: str = "") -> RunSummary:
    """Plan one cleanup run and send its first window; at most one run is active at a time.
    A *selection* narrows the run to some dag ids and an earlier cutoff. A trigger that finds
    another run active tops that run up, unless *top_up_active* is False (a local run, which
    must not take another process's chunks): then it is skipped, naming the active run.
    *database* (workers.identity) is recorded in the run it plans. *request* (the coordinator
    task's arguments, JSON) lets the pump send this coordinator again if it dies mid-plan."""
    batch = batch_size_for(settings, batch_size)
    run_id = check_run_id(run_id or new_run_id())
    bound = log.bind(run_id=run_id, source=source)

    if not settings.uses_metastore_backend:
        bound.info("custom backend configured; skipping", backend=settings.state_backend)
        load_backend(settings, engine, tables).cleanup()
        return RunSummary(run_id, "custom_backend")

    sender = Sender(settings, engine, tables, registry, dispatch)
    # This delivery's own token: two deliveries of one coordinator message share the run id
    # (and so the lock), but only the one that claimed the run may fail it before it starts.
    token = uuid.uuid4().hex
    # One step: the lock, the end of a run that let it lapse, and this run -> planning.
    taken = registry.take(run_id, settings.lock_ttl_seconds, token, source=source,
                          external=gate(settings).external, request=request)
    if taken.outcome == "held":
        holder = taken.detail
        if not top_up_active:
            why = f"run {holder} is active"
            registry.close_queued(run_id, why)
            registry.note_trigger("skipped", run_id, source, why)
            bound.info("coordinator_skipped_active_run", active_run_id=holder)
            return RunSummary(run_id, "skipped", active_run_id=holder, reason=why)
        return _trigger_active(sender, run_id, holder, source)
    if taken.outcome == "ended":
        record = registry.get(run_id)
        if record is not None and record.replans:
            # A late copy of a coordinator message the pump sent again (its first planner
            # died): the copy that planned the run saw it through.
            why = f"run {run_id} was planned again and has ended ({taken.detail})"
            bound.info("coordinator_late_copy", state=taken.detail)
            return RunSummary(run_id, "skipped", record.cutoff, active_run_id=run_id,
                              reason=why)
        raise InvalidArgument(f"run id {run_id!r} belongs to a run that already ended "
                              f"({taken.detail}); a new run needs a new id")
    if taken.outcome == "gated":
        status, why = _held_before_start(settings, registry) or (
            "paused" if taken.detail == "paused" else "outside_active_hours", taken.detail)
        registry.close_queued(run_id, why)
        registry.note_trigger(status, run_id, source, why)
        bound.info("coordinator_held", status=status, reason=why)
        return RunSummary(run_id, status, reason=why)

    if taken.detail == "running":
        # This coordinator's own message came back (its worker died after planning): the plan
        # stands; top up its window rather than plan again.
        existing, window = sender.pump(run_id)
        bound.info("cleanup_run_resumed", chunks=len(window.chunks))
        return RunSummary(run_id, "resumed", existing.cutoff if existing else "",
                          len(window.chunks), active_run_id=run_id)

    if database:
        registry.note_database(run_id, database)
    keeper = PlanningBeat(registry, run_id, token)
    keeper.start()
    started = False
    try:
        t0 = time.perf_counter()
        cutoff = selection.cutoff(cleanup.read_cutoff(engine))
        cutoff_iso = cutoff.isoformat()
        protected = cleanup.Protected(0, None)
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            plan = planners.choose(conn, tables, cutoff, batch, settings.planner, selection)
            if settings.protect_unfinished_dag_runs:
                protected = cleanup.count_protected(conn, tables, cutoff)
        planned_ms = (time.perf_counter() - t0) * 1000
        result = registry.start(
            run_id, plan, cutoff=cutoff_iso, batch_size=batch, source=source,
            window=settings.max_chunks_in_flight, lock_ttl=settings.run_timeout_seconds,
            resend_after=resend_after(settings), gate=Gate("", settings.max_run_seconds),
            selection=selection.encode())
        if isinstance(result, str) and result != "lock lost":
            # Another delivery of this coordinator (the same run id) started the run first:
            # it is that copy's run; this one leaves it alone.
            bound.warning("coordinator_duplicate", state=result)
            registry.note_trigger("skipped", run_id, source, f"run {run_id} is {result}")
            return RunSummary(run_id, "skipped", cutoff_iso, active_run_id=run_id,
                              reason=f"a duplicate delivery: run {run_id} is {result}")
        if isinstance(result, str):
            raise LockLost(f"run {run_id} could not start: {result}")
        started = True
        if protected.rows:
            registry.note_protected(run_id, protected.rows, protected.oldest.isoformat()
                                    if protected.oldest else "")
        bound.info("cleanup_run_started", cutoff=cutoff_iso, batch_size=batch,
                   table=tables.task_state.name, planner=plan.planner, reason=plan.reason,
                   estimated_chunks=plan.estimated_chunks, expected_rows=plan.expected_rows,
                   plan_ms=round(planned_ms, 1), protected_rows=protected.rows,
                   **({"selection": selection.describe()} if not selection.empty else {}))
        sent = sender.send(run_id, cutoff_iso, result, plan.kind)
        registry.note_trigger("started", run_id, source)
        bound.info("cleanup_run_dispatched", chunks=sent,
                   ms=round((time.perf_counter() - t0) * 1000, 1))
        if result.finished is not None:  # logged by the sender
            return RunSummary(run_id, "finished", cutoff_iso, 0, 0, planner=plan.planner,
                              reason=plan.reason)
        return RunSummary(run_id, "started", cutoff_iso, sent, plan.expected_rows,
                          planner=plan.planner, reason=plan.reason)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        state = registry.fail(run_id, error, started=started, token=token)
        registry.note_trigger("failed", run_id, source, error)
        if state != "failed":  # a run this process does not own: never touched
            bound.warning("cleanup_run_fail_refused", state=state, error=error)
        else:
            bound.error("cleanup_run_failed", error=error)
        raise
    finally:
        keeper.stop()


class PlanningBeat:
    """Renews a coordinator delivery's planning heartbeat from a thread while it plans: one
    that dies mid-plan stops beating, and the pump sends its message again (RunStore.replan)
    within seconds, rather than after the broker's visibility timeout."""

    def __init__(self, registry: RunStore, run_id: str, token: str,
                 every: float = BEAT_EVERY_SECONDS) -> None:
        self.registry, self.run_id, self.token, self.every = registry, run_id, token, every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"planning-beat-{run_id}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()

    def _beat(self) -> None:
        while not self._done.wait(self.every):
            try:
                if not self.registry.plan_beat(self.run_id, self.token):
                    return  # the claim passed on: START decides which plan stands
            except Exception as exc:  # noqa: BLE001 - a missed beat costs a resend at most
                log.warning("planning_beat_failed", run_id=self.run_id,
                            error=type(exc).__name__)


def _held_before_start(settings: Settings, registry: RunStore) -> tuple[str, str] | None:
    """(status, why) when flow control says no new run may start now."""
    paused = registry.paused()
    if paused is not None:
        until = (f" until {dt.datetime.fromtimestamp(paused.until, dt.UTC).isoformat()}"
                 if paused.until else "")
        return "paused", f"paused by {paused.by or 'someone'}{until}: {paused.reason or '-'}"
    g = gate(settings)
    if g.external:
        return "outside_active_hours", g.external
    return None


def _trigger_active(sender: Sender, run_id: str, holder: str, source: str) -> RunSummary:
    """Another run holds the lock: top up its window (lost, parked and new chunks) and restart
    its run-time budget, then report this trigger as skipped (or resumed, if it sent any)."""
    registry = sender.registry
    record, window = sender.pump(holder, new_budget=True)
    status = "resumed" if window.chunks else "paused" if window.held == "paused" else "skipped"
    why = f"run {holder} is active" + (f" (held: {window.held})" if window.held else "")
    registry.close_queued(run_id, why)
    registry.note_trigger(status, run_id, source, why)
    if status == "resumed":
        log.warning("cleanup_run_resumed", run_id=holder, chunks=len(window.chunks),
                    trigger=run_id)
    else:
        log.info("coordinator_skipped_active_run", run_id=run_id, active_run_id=holder,
                 held=window.held)
    # A resumed trigger reports the run it resumed, so a caller follows that run.
    return RunSummary(holder if window.chunks else run_id, status,
                      record.cutoff if record else "", len(window.chunks),
                      active_run_id=holder, reason=why)


def log_finished(record: RunRecord) -> None:
    log.info("cleanup_run_finished", run_id=record.run_id, state=record.state,
             rows=record.rows_deleted, chunks=record.chunks_done,
             chunks_failed=record.chunks_failed, duration=round(record.duration, 3),
             rows_per_second=round(record.rows_per_second, 1), planner=record.planner)
