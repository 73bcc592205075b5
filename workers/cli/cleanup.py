"""The commands that delete (or show what they would delete): ``cleanup``, Airflow's
``cleanup-task-states``, and ``orphans``. Dispatched to the workers by default, in-process with
``--local``, read-only with ``--dry-run``; arguments are checked before anything is sent."""

from __future__ import annotations

import click

from workers.cli.base import (
    BATCH,
    FORMAT,
    check_batch_option,
    echo_json,
    is_verbose,
    load_settings,
    record_json,
    require_privileges,
)
from workers.exceptions import RefusedError
from workers.runs import RunRecord
from workers.settings import Settings


@click.command()
@click.option("--dry-run", is_flag=True, help="Delete nothing; show what a run would delete.")
@click.option("--wait/--no-wait", default=False, show_default=True,
              help="Follow the run to its end with a progress bar on stderr.")
@BATCH
@click.option("--local", is_flag=True, help="Plan and delete in this process; no broker.")
@click.option("--pickup-timeout", default="120s", show_default=True, metavar="DURATION",
              help="With --wait: give up (exit 10) if no worker takes the run by then.")
@click.option("--dag-ids", default=None, metavar="IDS",
              help="Only state of these dag ids (comma-separated), as airflow db clean.")
@click.option("--exclude-dag-ids", default=None, metavar="IDS",
              help="Not state of these dag ids (comma-separated).")
@click.option("--clean-before-timestamp", default=None, metavar="TIMESTAMP",
              help="Only state that expired before this ISO-8601 time (UTC if no offset): a "
                   "grace period. Never later than the database's now.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1, 1000),
              help="With --dry-run: how many dag ids to list by expired rows.")
@FORMAT
@click.pass_context
def cleanup(ctx: click.Context, dry_run: bool, wait: bool, batch_size: int | None, local: bool,
            pickup_timeout: str, dag_ids: str | None, exclude_dag_ids: str | None,
            clean_before_timestamp: str | None, top: int, fmt: str) -> None:
    """Run a cleanup of expired task state now (dispatched to the workers by default)."""
    _cleanup(ctx, dry_run=dry_run, wait=wait, batch_size=batch_size, local=local, fmt=fmt,
             pickup_timeout=pickup_timeout, top=top,
             selection=_selection(dag_ids, exclude_dag_ids, clean_before_timestamp))


def _selection(dag_ids: str | None, exclude_dag_ids: str | None,
               before: str | None) -> dict[str, str]:
    """The selection options as the coordinator task takes them, checked here first: a bad
    one is one line naming the option, before anything is sent."""
    from workers.exceptions import InvalidArgument
    from workers.selection import Selection

    given = {k: v for k, v in (("dag_ids", dag_ids), ("exclude_dag_ids", exclude_dag_ids),
                               ("clean_before_timestamp", before)) if v is not None}
    try:
        Selection.from_args(**given)
    except InvalidArgument as exc:
        name = str(exc).split(" ", 1)[0].rstrip(":")
        raise InvalidArgument(str(exc).replace(name, "--" + name.replace("_", "-"), 1)) from None
    return given


@click.command("cleanup-task-states")
@click.option("--dry-run", is_flag=True, help="Delete nothing; show what a run would delete.")
@click.option("--verbose", is_flag=True, help="Log at STATESWEEP_LOG_LEVEL on stderr.")
@click.pass_context
def cleanup_task_states(ctx: click.Context, dry_run: bool, verbose: bool) -> None:
    """Airflow's name for it: the same as `cleanup --wait` (or `cleanup --dry-run`)."""
    if verbose:
        ctx.find_root().obj["verbose"] = True
    _cleanup(ctx, dry_run=dry_run, wait=True, batch_size=None, local=False, fmt="text")


def _cleanup(ctx: click.Context, *, dry_run: bool, wait: bool, batch_size: int | None,
             local: bool, fmt: str, pickup_timeout: str = "120s", top: int = 10,
             selection: dict[str, str] | None = None) -> None:
    from workers.cli import dispatch, render
    from workers.cli.control import duration_option

    check_batch_option(batch_size)
    pickup_seconds = duration_option("--pickup-timeout", pickup_timeout)
    settings = load_settings(is_verbose(ctx))
    if settings.airflow_custom_backend:
        skip_custom_backend(settings, fmt)
        return
    from workers.selection import Selection

    chosen = Selection.from_args(**(selection or {}))
    if dry_run:
        data = dispatch.dry_run(settings, batch_size, chosen, top=top)
        echo_json(data) if fmt == "json" else click.echo(render.dry_run(data))
        return
    if local:
        require_privileges(settings, "task_state")  # one line, not a failed DELETE's trace
        record = dispatch.run_local(settings, batch_size, chosen)
    else:
        followed = _dispatch_and_follow(settings, batch_size, selection, wait=wait, fmt=fmt,
                                        pickup_seconds=pickup_seconds)
        if followed is None:
            return
        record = followed
    echo_json(record_json(record)) if fmt == "json" else click.echo(render.run_summary(record))
    raise_unless_finished(record)


def _dispatch_and_follow(settings: Settings, batch_size: int | None,
                         selection: dict[str, str] | None, *, wait: bool, fmt: str,
                         pickup_seconds: float) -> RunRecord | None:
    """Send the coordinator, wait for a worker to take it, and with *wait* follow the run to
    its end (None without: the run id is printed). Refusals raise, naming why."""
    from workers.cli import dispatch
    from workers.cli.progress import ProgressBar, follow_run
    from workers.cli.services import client_app, shared_run_store
    from workers.cli.watch import Watch, watch_run

    registry = shared_run_store(settings)
    watch = Watch()
    try:
        with client_app(settings) as app:
            run_id, result = dispatch.dispatch_cleanup(app, settings, registry, batch_size,
                                                       source="cli", selection=selection)
            try:
                click.echo(f"dispatched run {run_id} (coordinator task {result.id}) to "
                           f"{settings.control_queue}; recorded as queued", err=True)
                # Opened before the first read of the run: every change after it wakes the
                # wait.
                watch = watch_run(settings.effective_run_store_url, settings.key_prefix, run_id)
            except KeyboardInterrupt:  # Ctrl-C as soon as the run was sent: say how to follow
                raise dispatch.stopped_waiting(settings.control_queue, run_id) from None
            pickup = dispatch.await_pickup(
                registry, run_id, result, queue=settings.control_queue,
                timeout=pickup_seconds if wait else dispatch.NO_WAIT_PICKUP_SECONDS,
                watch=watch)
        if pickup.status == "queued" and wait:
            from workers.cli.progress import RunStuck

            raise RunStuck(f"run {run_id} is still queued after {pickup_seconds:.0f}s: no worker "
                           f"has taken its coordinator from {settings.control_queue} "
                           "(`statesweep doctor` lists workers). It runs when one does; drop it "
                           f"with: statesweep abort {run_id}")
        if pickup.status == "queued":
            click.echo(f"no worker has taken it yet; it runs when a worker consumes "
                       f"{settings.control_queue} (`statesweep doctor` lists workers)", err=True)
        if pickup.status == "skipped":
            # Not the active run's id on stdout: `run=$(statesweep cleanup)` must not get
            # another run's id. The same exit code as `cleanup --local` behind an active run.
            if fmt == "json":
                echo_json({"run_id": "", "task_id": result.id, "status": "skipped",
                           "active_run_id": pickup.run_id})
            raise RefusedError(f"skipped: run {pickup.run_id} is active; one run at a time. "
                               f"Follow it with: statesweep status {pickup.run_id} --follow")
        if pickup.status in dispatch.NOT_STARTED:
            if fmt == "json":
                echo_json({"run_id": run_id, "task_id": result.id, "status": pickup.status,
                           "reason": pickup.reason})
            raise RefusedError(f"{pickup.status.replace('_', ' ')}: {pickup.reason}; run "
                               f"{run_id} was not started (recorded as skipped)")
        if pickup.run_id != run_id:  # following the run this trigger resumed, not its own
            watch.close()
            watch = watch_run(settings.effective_run_store_url, settings.key_prefix,
                              pickup.run_id)
        if not wait or pickup.status == "custom_backend":
            if fmt == "json":
                echo_json({"run_id": pickup.run_id, "task_id": result.id, "status": pickup.status})
            else:
                click.echo(pickup.run_id)
            return None
        return follow_run(registry, pickup.run_id, ProgressBar(f"run {pickup.run_id}"),
                          settings=settings, pickup_timeout=pickup_seconds, watch=watch)
    finally:
        watch.close()


def raise_unless_finished(record: RunRecord) -> None:
    """A followed run that ended other than 'finished' is the command's failure, named."""
    from workers.cli import dispatch

    if record.state == "failed":
        raise dispatch.RunFailed(f"run {record.run_id} failed: {record.error}")
    if record.state == "aborted":
        raise dispatch.RunAborted(f"run {record.run_id} was aborted before it finished "
                                  f"({record.error or 'aborted'}); {record.rows_deleted:,} rows "
                                  "deleted, the rest wait for the next run")
    if record.state == "skipped":
        raise RefusedError(f"run {record.run_id} was skipped: {record.error or 'not started'}")


@click.command()
@click.option("--dry-run", is_flag=True, help="Delete nothing; count orphaned rows.")
@click.option("--wait/--no-wait", default=False, show_default=True,
              help="Wait for the sweep to finish and print what it deleted.")
@BATCH
@click.option("--local", is_flag=True, help="Sweep in this process; no broker.")
@FORMAT
@click.pass_context
def orphans(ctx: click.Context, dry_run: bool, wait: bool, batch_size: int | None, local: bool,
            fmt: str) -> None:
    """Sweep asset state of inactive assets now (dispatched to the workers by default)."""
    from workers.cli import dispatch, render
    from workers.cli.services import client_app

    check_batch_option(batch_size)
    settings = load_settings(is_verbose(ctx))
    if settings.airflow_custom_backend:
        skip_custom_backend(settings, fmt)
        return
    if dry_run:
        data = dispatch.orphans_dry_run(settings)
    elif local:
        require_privileges(settings, "asset_state")
        data = dispatch.orphans_local(settings, batch_size)
    else:
        with client_app(settings) as app:
            result = dispatch.dispatch_orphans(app, settings, batch_size)
            click.echo(f"dispatched orphan sweep task {result.id} to {settings.control_queue}",
                       err=True)
            if not wait:
                echo_json({"task_id": result.id}) if fmt == "json" else click.echo(result.id)
                return
            data = dispatch.wait_for_task(result, "orphan sweep")
            if data.get("status") == "refused":
                raise RefusedError(f"refused: {data.get('reason')}; orphan sweep {result.id} "
                                   "deleted nothing")
    echo_json(data) if fmt == "json" else click.echo(render.orphans(data))


def skip_custom_backend(settings: Settings, fmt: str) -> None:
    """Airflow names a state backend other than its metastore: the state is not in the tables
    statesweep cleans, so nothing is read, sent or deleted; upstream's cleanup skips too."""
    message = (f"custom backend configured — skipping: {settings.state_backend} (from "
               f"{settings.source_of('state_backend')}) keeps Airflow's state elsewhere; "
               "nothing was deleted")
    click.echo(message, err=True)
    if fmt == "json":
        echo_json({"status": "custom_backend", "backend": settings.state_backend,
                   "deleted": 0})
    else:
        click.echo("custom_backend")
