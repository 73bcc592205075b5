"""Ad-hoc cleanup runs from the CLI: dispatched to the workers, run in-process, or dry.

A dispatched run enters at the same coordinator task beat uses, with a run id chosen here so
the CLI can follow it from the first chunk. The run store is the only source of progress.
workers.celery_app is imported only when a command needs it: it reads settings at import, and
the demo sets its own first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from workers.cli.progress import FollowInterrupted, ProgressBar, RunStuck, Snapshot, poll_delays
from workers.cli.services import (
    ServiceUnavailable,
    check_broker,
    check_result_backend,
    database,
    own_identity,
    run_store,
)
from workers.cli.watch import Watch
from workers.exceptions import RefusedError, StatesweepError
from workers.runs import RunRecord, RunRegistry

# The pipeline's modules (chunk, cleanup, coordinator, planners) are imported by the commands
# that run it here (--local, --dry-run): dispatching to the workers needs none of them, and an
# empty `cleanup --wait` is mostly process start and imports.
from workers.selection import Selection
from workers.settings import Settings

if TYPE_CHECKING:  # Celery is imported only by the commands that send tasks
    from celery import Celery
    from celery.result import AsyncResult

PICKUP_NOTE_SECONDS = 10.0
PICKUP_POLL_SECONDS = 0.2
NO_WAIT_PICKUP_SECONDS = 5.0


class RunFailed(StatesweepError):
    """The coordinator, a run or a task failed; the message carries its error."""


class RunAborted(StatesweepError):
    """The followed run was aborted (`statesweep abort`) before it finished."""


@dataclass(frozen=True)
class Pickup:
    """What became of a dispatched coordinator: the run to follow, and how it got there."""

    run_id: str
    status: str  # recorded | skipped | paused | outside_active_hours | resumed | custom_backend
    #              | queued
    reason: str = ""


def note(message: str) -> None:
    click.echo(message, err=True)


def dispatch_cleanup(app: Celery, settings: Settings, registry: RunRegistry,
                     batch_size: int | None, source: str,
                     selection: dict[str, Any] | None = None) -> tuple[str, AsyncResult]:
    """Send the coordinator to the control queue, as beat does, with a run id chosen here and
    recorded as ``queued`` first, so `status <id>` knows the run from the moment it is sent.
    The run carries this CLI's database identity: the coordinator refuses it if the workers
    clean another database."""
    from workers.celery_app import COORDINATE
    from workers.run_ids import new_run_id

    identity = database_identity(settings, registry)
    sent: AsyncResult | None = None
    try:
        # The producer that sends is the one whose connection is checked: one broker
        # connection.
        with app.producer_or_acquire() as producer:
            check_broker(app, settings, producer.connection)
            check_result_backend(settings)
            run_id = new_run_id()
            if not registry.enqueue(run_id, source):
                raise RefusedError(f"run id {run_id} is already recorded; try again")
            # Ctrl-C while the message goes out is held until it is out (or failed): one that
            # landed mid-send could not tell whether the broker had it, and closing the record
            # then would leave a sent coordinator behind a run marked as never sent.
            with deferred_interrupt() as interrupt:
                try:
                    sent = app.send_task(COORDINATE, queue=settings.control_queue,
                                         producer=producer,
                                         kwargs={"batch_size": batch_size, "source": source,
                                                 "run_id": run_id, **(selection or {}),
                                                 "expect_database": identity})
                except BaseException:
                    registry.close_queued(run_id, "the coordinator could not be sent")
                    raise
            if interrupt.pending:
                raise stopped_waiting(settings.control_queue, run_id)
    except KeyboardInterrupt:
        if sent is None:
            raise
        # Sent, then Ctrl-C while the producer went back to its pool: the run is on its way.
        raise stopped_waiting(settings.control_queue, run_id) from None
    return run_id, sent


@dataclass
class Interrupt:
    pending: bool = False


@contextmanager
def deferred_interrupt() -> Iterator[Interrupt]:
    """Hold SIGINT for the block (main thread only: elsewhere no handler can be set); the
    caller reads ``pending`` afterwards and answers it when the block's work is whole."""
    import signal
    import threading

    interrupt = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return

    def hold(_signum: int, _frame: object) -> None:
        interrupt.pending = True

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield interrupt
    finally:
        signal.signal(signal.SIGINT, previous)


def stopped_waiting(queue: str, run_id: str) -> FollowInterrupted:
    """What Ctrl-C says once the coordinator of run *run_id* is on *queue*, whenever it comes
    before a worker took it: the run is not touched, and this is how to follow it."""
    return FollowInterrupted(
        f"stopped waiting; the coordinator stays queued on {queue} and runs as {run_id} "
        f"when a worker takes it. Follow it with: statesweep status {run_id} --follow")


#: How long the CLI trusts the database identity it read last for the same URL. Reading it
#: costs SQLAlchemy, the driver and a connection, most of an empty `cleanup --wait`; a stale
#: one cannot delete anything wrongly: the coordinator compares it with the workers' own and
#: refuses a run meant for another database, so it only delays the CLI's own early message.
IDENTITY_CACHE_SECONDS = 300


def database_identity(settings: Settings, registry: RunRegistry) -> dict[str, str]:
    """This CLI's database identity (services.own_identity, encoded), read from the database at
    most once per IDENTITY_CACHE_SECONDS for a URL: kept in the run store under a hash of the
    URL with its password masked, beside the runs it is sent with."""
    import hashlib
    import json

    from workers.settings import mask_url

    name = hashlib.sha256(f"{mask_url(settings.database_url)}|{settings.table_naming}"
                          .encode()).hexdigest()[:32]
    key = f"{registry.prefix}:identity:{name}"
    cached = registry.client.get(key)
    if cached:
        return dict(json.loads(cached))
    identity = own_identity(settings).encode()
    registry.client.set(key, json.dumps(identity), ex=IDENTITY_CACHE_SECONDS)
    return identity


def coordinator_outcome(result: AsyncResult) -> dict[str, Any]:
    """The coordinator's summary, or RunFailed with its error."""
    if result.failed():
        err = result.result
        raise RunFailed(f"the coordinator failed: {type(err).__name__}: {err}")
    value = result.result
    return value if isinstance(value, dict) else {}


#: Coordinator outcomes that start no run (the queued record ends 'skipped', saying why);
#: 'refused': the workers clean another database than this CLI's.
NOT_STARTED = ("skipped", "paused", "outside_active_hours", "refused")


def await_pickup(registry: RunRegistry, run_id: str, result: AsyncResult, *,
                 queue: str, timeout: float, watch: Watch | None = None) -> Pickup:
    """Wait until a worker has started the run or answered for the coordinator; 'queued' if
    none has after *timeout* seconds. With a *watch* on the run, each change of the run
    ends a wait at once (the coordinator starting it, or closing it as skipped)."""
    watch = watch or Watch()
    start = time.monotonic()
    noted = False
    delays = poll_delays(PICKUP_POLL_SECONDS)
    try:
        while True:
            record = registry.get(run_id)
            if record is not None and record.state not in ("queued", "skipped"):
                return Pickup(run_id, "recorded")
            if result.ready():
                return _outcome_pickup(registry, run_id, coordinator_outcome(result))
            if record is None:
                raise RunStuck(f"run {run_id} was recorded as queued but is no longer in the "
                               "run store (removed or expired); nothing will report on it")
            waited = time.monotonic() - start
            if waited >= timeout:
                return Pickup(run_id, "queued")
            if not noted and waited >= PICKUP_NOTE_SECONDS:
                note(f"waiting for a worker to take the coordinator from queue {queue} "
                     "(is a worker consuming it? `statesweep doctor` checks)")
                noted = True
            watch.wait(next(delays))
    except KeyboardInterrupt:
        raise stopped_waiting(queue, run_id) from None


def _outcome_pickup(registry: RunRegistry, run_id: str, outcome: dict[str, Any]) -> Pickup:
    status = str(outcome.get("status", ""))
    if status in NOT_STARTED:
        active = str(outcome.get("active_run_id", ""))
        why = str(outcome.get("reason", "")) or f"run {active} is active"
        if status != "refused":  # the command's error says why, once
            note(f"this trigger was {status.replace('_', ' ')}: {why}")
        return Pickup(active if status == "skipped" else run_id, status, why)
    if status == "resumed":
        # A stalled run held the lock: the trigger re-sent its missing chunks instead of
        # starting this one, so the run to follow is that one.
        resumed = str(outcome.get("run_id") or outcome.get("active_run_id", ""))
        note(f"run {resumed} had stalled; this trigger resumed it (re-sent "
             f"{outcome.get('chunks', 0)} unfinished chunks) instead of starting run {run_id}")
        return Pickup(resumed, "resumed")
    if status == "custom_backend":
        note("a custom STATESWEEP_STATE_BACKEND is configured: its cleanup() ran")
        registry.close_queued(run_id, "custom state backend: its own cleanup() ran")
        return Pickup(run_id, "custom_backend")
    record = registry.get(run_id)
    if record is not None and record.state != "queued":
        return Pickup(run_id, "recorded")
    raise RunFailed(f"the coordinator returned {outcome!r} but run {run_id} was not started")


def run_local(settings: Settings, batch_size: int | None,
              selection: Selection | None = None) -> RunRecord:
    """Plan and delete in this process, chunk by chunk; the lock lives in the shared run store
    (Redis when configured), so a local run and the workers still run one at a time."""
    from workers import chunk, cleanup, coordinator

    try:
        registry = run_store(settings)
    except ServiceUnavailable as exc:
        raise ServiceUnavailable(
            f"{exc}; a local run takes its lock there so it never overlaps the workers' runs. "
            "With no Redis at all, set STATESWEEP_RUN_STORE_URL=memory://") from exc.__cause__
    batch = coordinator.batch_size_for(settings, batch_size)
    with database(settings) as (engine, tables):
        # An estimate for the progress bar; the run fixes its own cutoff.
        expected = cleanup.count_expired(engine, tables, cleanup.read_cutoff(engine))
        chunks = 0 if expected == 0 else (1 if batch == 0 else math.ceil(expected / batch))
        bar = ProgressBar("local run")
        done = {"chunks": 0, "rows": 0}
        t0 = time.monotonic()

        def snapshot(ended: bool = False) -> Snapshot:
            return Snapshot(done["chunks"], max(chunks, done["chunks"]), done["rows"],
                            expected, time.monotonic() - t0, ended=ended)

        def on_chunk(_number: int, _range: object, rows: int) -> None:
            done["chunks"] += 1
            done["rows"] += rows
            bar.update(snapshot())

        bar.update(snapshot())  # from the start, before the first chunk's DELETE
        try:
            summary = chunk.run_local(settings, engine, tables, registry,
                                      batch_size=batch, source="cli-local",
                                      on_chunk=on_chunk, selection=selection or Selection())
        finally:
            bar.close(snapshot(ended=True))
    if summary.status == "skipped":
        raise RefusedError(
            f"run {summary.active_run_id} is active; one run at a time, so no local run was "
            f"started. Follow it with: statesweep status {summary.active_run_id} --follow")
    record = registry.get(summary.run_id)
    if record is None:  # a custom backend ran its own cleanup(); there is no run to report
        return RunRecord(summary.run_id, summary.status, source="cli-local")
    return record


def dry_run(settings: Settings, batch_size: int | None,
            selection: Selection | None = None, top: int = 10) -> dict[str, Any]:
    """What a run now would delete: counts, chunks, the top dag_ids, a sample, and the rows
    kept for unfinished dag runs. Deletes nothing."""
    from workers import cleanup, coordinator, planners

    selection = selection or Selection()
    batch = coordinator.batch_size_for(settings, batch_size)
    with database(settings) as (engine, tables):
        cutoff = selection.cutoff(cleanup.read_cutoff(engine))
        summary = cleanup.summarise_expired(engine, tables, cutoff, batch, top=top,
                                            selection=selection)
        protected = cleanup.Protected(0, None)
        if settings.protect_unfinished_dag_runs:
            with engine.connect() as conn:
                protected = cleanup.count_protected(conn, tables, cutoff)
        table = tables.task_state.name
        # The planner a run would use, chosen as the coordinator does: probes, no row reads.
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            plan = planners.choose(conn, tables, cutoff, batch, settings.planner, selection)
    return {
        "dry_run": True, "table": table, "cutoff": summary.cutoff.isoformat(),
        "expired_rows": summary.expired_rows, "batch_size": batch, "chunks": summary.chunks,
        "planner": plan.planner, "planner_reason": plan.reason,
        "estimated_chunks": plan.estimated_chunks, "estimated_rows": plan.expected_rows,
        "selection": selection.describe(),
        "protected_rows": protected.rows,
        "protected_oldest": protected.oldest.isoformat() if protected.oldest else None,
        "top_dag_ids": [{"dag_id": d, "rows": n} for d, n in summary.top_dags],
        "sample": [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
                   for row in summary.sample],
    }


def orphans_dry_run(settings: Settings) -> dict[str, Any]:
    from workers import cleanup

    with database(settings) as (engine, tables), engine.connect() as conn:
        count = cleanup.count_orphaned_asset_state(conn, tables)
        return {"dry_run": True, "table": tables.asset_state.name, "orphaned_rows": count}


def orphans_local(settings: Settings, batch_size: int | None) -> dict[str, Any]:
    from workers import cleanup, coordinator

    batch = coordinator.batch_size_for(settings, batch_size)
    t0 = time.perf_counter()
    with database(settings) as (engine, tables):
        swept = cleanup.sweep_orphaned_asset_state(
            engine, tables, batch, lock_timeout_ms=settings.lock_timeout_ms,
            statement_timeout_ms=settings.statement_timeout_ms)
    return {"rows": swept.rows, "batches": swept.batches,
            "seconds": round(time.perf_counter() - t0, 3)}


def dispatch_orphans(app: Celery, settings: Settings, batch_size: int | None) -> AsyncResult:
    """Send the orphan sweep; with a shared run store it is recorded as queued first, so
    `status <task id>` knows it before a worker takes it."""
    import uuid

    from workers.celery_app import SWEEP_ORPHANS
    from workers.settings import is_redis_store

    identity = own_identity(settings)
    check_broker(app, settings)
    check_result_backend(settings)
    task_id = str(uuid.uuid4())
    if is_redis_store(settings.effective_run_store_url):
        run_store(settings).record_sweep(f"orphans-{task_id}", "queued")
    return app.send_task(SWEEP_ORPHANS, queue=settings.control_queue, task_id=task_id,
                         kwargs={"batch_size": batch_size,
                                 "expect_database": identity.encode()})


def wait_for_task(result: AsyncResult, what: str) -> dict[str, Any]:
    """Poll a task's result (Ctrl-C stops waiting, not the task); RunFailed if it failed."""
    start = time.monotonic()
    last = 0.0
    delays = poll_delays(PICKUP_POLL_SECONDS)
    try:
        while not result.ready():
            waited = time.monotonic() - start
            if waited - last >= 5:
                note(f"{what} {result.id}: {result.state.lower()} after {waited:.0f}s")
                last = waited
            time.sleep(next(delays))
    except KeyboardInterrupt:
        raise FollowInterrupted(
            f"stopped waiting for {what} {result.id}; it goes on in the workers") from None
    if result.failed():
        err = result.result
        raise RunFailed(f"{what} {result.id} failed: {type(err).__name__}: {err}")
    value = result.result
    return value if isinstance(value, dict) else {"result": value}
