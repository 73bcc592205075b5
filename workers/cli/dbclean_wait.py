"""``statesweep db-clean`` on the workers: send the db-clean coordinator with a run id recorded as
queued first (so `status <id>` knows it at once), then wait for the run to end, printing each
table's progress on stderr, and asking for a pump every STATESWEEP_PUMP_INTERVAL_SECONDS (it
resends chunks a dead worker held; beat does too when db-clean's beat entry is on). Ctrl-C stops
the waiting, not the run."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import click

from workers.exceptions import RefusedError

if TYPE_CHECKING:
    from workers.dbclean.run import Report, Request
    from workers.settings import Settings

POLL_SECONDS = 0.5
#: How long the run may stay queued (no worker took its coordinator) before the CLI gives up.
PICKUP_SECONDS = 120.0


def dispatch_and_wait(settings: Settings, request: Request, version: str) -> Report:
    from workers.celery_app import DB_CLEAN, DB_CLEAN_PUMP
    from workers.cli.dispatch import RunAborted, RunFailed, database_identity
    from workers.cli.progress import RunStuck
    from workers.cli.services import check_broker, client_app, shared_run_store
    from workers.dbclean.run import Report, TableResult
    from workers.dbclean.store import DbCleanStore
    from workers.run_ids import new_run_id

    registry = shared_run_store(settings)
    store = DbCleanStore(registry)
    # The workers refuse the run if they clean another database than this command read.
    identity = database_identity(settings, registry)
    with client_app(settings) as app:
        check_broker(app, settings)
        run_id = new_run_id()
        if not registry.enqueue(run_id, "cli"):
            raise RefusedError(f"run id {run_id} is already recorded; try again")
        result = app.send_task(DB_CLEAN, queue=settings.control_queue, kwargs={
            "clean_before_timestamp": request.before.isoformat(),
            "tables": list(request.tables), "dag_ids": list(request.dag_ids),
            "exclude_dag_ids": list(request.exclude_dag_ids),
            "batch_size": request.batch_size, "skip_archive": request.skip_archive,
            "source": "cli", "run_id": run_id, "expect_database": identity})
        click.echo(f"dispatched db-clean run {run_id} to {settings.control_queue}", err=True)
        shown: dict[str, tuple[Any, ...]] = {}
        start = last_pump = time.monotonic()
        try:
            while True:
                record = registry.get(run_id)
                if result.failed():
                    raise RunFailed(f"the db-clean coordinator failed: "
                                    f"{type(result.result).__name__}: {result.result}")
                if record is None or record.state == "queued":
                    if time.monotonic() - start > PICKUP_SECONDS:
                        raise RunStuck(f"db-clean run {run_id} is still queued after "
                                       f"{PICKUP_SECONDS:.0f}s: no worker has taken it from "
                                       f"{settings.control_queue}; drop it with: statesweep "
                                       f"abort {run_id}")
                else:
                    for t in store.tables(run_id):
                        now = (t["state"], t["deleted"], t["chunks"], t["failed"])
                        if t["state"] and shown.get(t["table"]) != now:
                            shown[t["table"]] = now
                            click.echo(f"{t['table']}: {t['deleted']:,} of {t['eligible']:,} "
                                       f"rows, {t['chunks']} chunks"
                                       + (" (held: " + record.held + ")" if record.held
                                          else ""), err=True)
                    if record.ended:
                        break
                if time.monotonic() - last_pump >= settings.pump_interval_seconds:
                    app.send_task(DB_CLEAN_PUMP, queue=settings.control_queue,
                                  kwargs={"run_id": run_id},
                                  expires=settings.pump_interval_seconds * 2)
                    last_pump = time.monotonic()
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            raise RefusedError(f"stopped waiting; db-clean run {run_id} goes on in the "
                               f"workers (statesweep status {run_id})") from None
    if record.state == "skipped":
        raise RefusedError(f"db-clean run {run_id} was skipped: {record.error}")
    if record.state == "aborted":
        raise RunAborted(f"db-clean run {run_id} was aborted before it finished "
                         f"({record.error or 'aborted'}); {record.rows_deleted:,} rows moved")
    fields = set(TableResult.__dataclass_fields__)
    tables = [TableResult(**{k: v for k, v in t.items() if k in fields})
              for t in store.tables(run_id)]
    if record.state == "failed" and not any(t.failed for t in tables):
        raise RunFailed(f"db-clean run {run_id} failed: {record.error}")
    click.echo(f"db-clean run {run_id} {record.state}", err=True)
    return Report(version, request.before, False, tables)
