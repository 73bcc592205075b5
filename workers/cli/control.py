"""`statesweep pause`, `resume` and `abort`: the operator's controls, straight on the run store.

They call workers.control (the same functions the control-queue tasks statesweep.pause,
statesweep.resume and statesweep.abort wrap for Flower and `celery call`), so every argument is
checked before anything changes. No worker is needed: the run store is the switch. `resume`
then asks the workers for one pump so the parked chunks go out now; with no broker the next
beat pump sends them.
"""

from __future__ import annotations

import getpass
import socket

import click

from workers.cli.base import FORMAT, echo_json, is_verbose, iso_utc, load_settings, record_json
from workers.exceptions import InvalidArgument


def duration_option(name: str, value: str) -> float:
    """A DURATION option (``90s``, ``15m``, ``1h30m``, plain seconds) in seconds, or
    InvalidArgument naming the option and the value."""
    from workers.flow.durations import parse_duration

    try:
        return float(parse_duration(value))
    except ValueError as exc:
        raise InvalidArgument(f"{name}: {exc}") from None


def operator() -> str:
    """Who is at the keyboard, recorded with a pause or an abort."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (a bare container)
        user = "unknown"
    return f"{user}@{socket.gethostname()} (cli)"


@click.command("pause")
@click.option("--for", "for_", metavar="DURATION", default=None,
              help="End the pause by itself after this long (90s, 15m, 1h30m, 1d).")
@click.option("--reason", default="", help="Why; shown by status and doctor.")
@FORMAT
@click.pass_context
def pause(ctx: click.Context, for_: str | None, reason: str, fmt: str) -> None:
    """Pause all cleanup: no new chunk starts (running ones finish); triggers are recorded as
    paused. A paused run resumes where it stopped."""
    from workers import control
    from workers.cli.services import shared_run_store

    seconds = duration_option("--for", for_) if for_ is not None else None
    settings = load_settings(is_verbose(ctx))
    registry = shared_run_store(settings)
    paused = control.pause(registry, by=operator(), reason=reason, seconds=seconds)
    active = registry.active_run()
    data = {"paused": True, "by": paused.by, "reason": paused.reason, "at": iso_utc(paused.at),
            "until": iso_utc(paused.until), "active_run_id": active or ""}
    if fmt == "json":
        echo_json(data)
        return
    until = f" until {data['until']}" if paused.until else " until `statesweep resume`"
    click.echo(f"paused{until}" + (f": {paused.reason}" if paused.reason else ""))
    if active:
        click.echo(f"run {active} holds its remaining chunks; running chunks finish", err=True)


@click.command("resume")
@FORMAT
@click.pass_context
def resume(ctx: click.Context, fmt: str) -> None:
    """Lift the pause; the active run's parked chunks are sent again."""
    from workers import control
    from workers.cli.services import ServiceUnavailable, check_broker, client_app, shared_run_store

    settings = load_settings(is_verbose(ctx))
    registry = shared_run_store(settings)
    lifted = control.resume(registry, by=operator())
    from workers.celery_app import DB_CLEAN_PUMP, PUMP
    from workers.dbclean.store import DbCleanStore

    # The active cleanup run and the active db-clean run (each has its own lock and pump).
    runs = [(task, run_id) for task, run_id in (
        (PUMP, registry.active_run()), (DB_CLEAN_PUMP, DbCleanStore(registry).active_run()))
        if run_id]
    active = ", ".join(run_id for _, run_id in runs)
    pumped = False
    if runs:
        try:
            with client_app(settings) as app:
                check_broker(app, settings)
                for task, run_id in runs:
                    app.send_task(task, queue=settings.control_queue,
                                  kwargs={"run_id": run_id})
                pumped = True
        except ServiceUnavailable as exc:
            click.echo(f"note: {exc}; the next beat pump (every "
                       f"{settings.pump_interval_seconds:g}s) sends run {active}'s parked chunks",
                       err=True)
    if fmt == "json":
        echo_json({"resumed": True, "was": {**lifted.as_dict(), "at": iso_utc(lifted.at),
                                            "until": iso_utc(lifted.until)},
                   "active_run_id": active or "", "pump_sent": pumped})
        return
    click.echo(f"resumed (paused by {lifted.by or 'someone'} at {iso_utc(lifted.at)})")
    if pumped:
        click.echo(f"sent a pump for run {active}: its parked chunks go out now", err=True)


@click.command("abort")
@click.argument("run_id")
@FORMAT
@click.pass_context
def abort(ctx: click.Context, run_id: str, fmt: str) -> None:
    """End RUN_ID now (state aborted): its lock is freed, its queued chunks delete nothing, its
    remaining rows wait for the next run."""
    from workers import control
    from workers.cli.services import shared_run_store

    settings = load_settings(is_verbose(ctx))
    record = control.abort(shared_run_store(settings), run_id, by=operator())
    if fmt == "json":
        echo_json(record_json(record))
        return
    click.echo(f"run {record.run_id} aborted: {record.chunks_done} chunks, "
               f"{record.rows_deleted:,} rows deleted; the lock is free for the next run")
