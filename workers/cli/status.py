"""What `statesweep status` reports: the active run (planner, progress, held, stalled), the
pause, recent runs, orphan sweeps and failed triggers, and the backlog of expired rows. All but
the backlog come from the shared run store; the backlog is one indexed count on the database."""

from __future__ import annotations

from typing import Any

import click

from workers import cleanup
from workers.cli.base import FORMAT, echo_json, is_verbose, iso_utc, load_settings, record_json
from workers.cli.services import database, shared_run_store
from workers.exceptions import NotFound
from workers.runs import RunRecord, RunRegistry
from workers.settings import Settings, mask_url


def find_run(settings: Settings, registry: RunRegistry, run_id: str) -> RunRecord:
    record = registry.get(run_id)
    if record is None:
        raise NotFound(
            f"unknown run id {run_id!r}: no cleanup run with that id is recorded in the run store "
            f"{mask_url(settings.effective_run_store_url)} under STATESWEEP_KEY_PREFIX="
            f"{settings.key_prefix!r} (runs are kept 7 days; `statesweep status` lists them)")
    return record


def backlog(settings: Settings) -> dict[str, Any]:
    """Expired rows waiting for a run, at the database's now(); the error text if unreachable.

    Runs live in the run store, so a database that is down costs `status` this one figure,
    never the rest: the error is one line naming the database (masked) and why."""
    from sqlalchemy.exc import SQLAlchemyError

    from workers.cli.services import ServiceUnavailable
    from workers.exceptions import SchemaError

    try:
        with database(settings) as (engine, tables):
            now = cleanup.read_cutoff(engine)
            count = cleanup.count_expired(engine, tables, now)
            return {"table": tables.task_state.name, "now": now.isoformat(),
                    "expired_rows": count}
    except ServiceUnavailable as exc:
        return {"error": f"{exc}: {_first_line(exc.__cause__ or exc)}"}
    except (SQLAlchemyError, SchemaError) as exc:
        return {"error": _first_line(getattr(exc, "orig", None) or exc)}


def _first_line(exc: BaseException) -> str:
    """An error as one line, secrets masked: drivers quote the server's multi-line text."""
    from workers.settings import mask_secrets

    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__
    return mask_secrets(text)


def overview(settings: Settings, limit: int) -> tuple[dict[str, Any], list[RunRecord]]:
    from workers.cli import stalls

    registry = shared_run_store(settings)
    records = registry.recent(limit)
    active_id = registry.active_run() or ""
    active = registry.get(active_id) if active_id else None
    paused = registry.paused()
    data = {
        "active_run_id": active_id,
        "active_run": None if active is None else {
            **record_json(active),
            "condition": stalls.condition(settings, registry, active).as_dict()},
        "paused": None if paused is None else {
            "by": paused.by, "reason": paused.reason, "at": iso_utc(paused.at),
            "until": iso_utc(paused.until)},
        "runs": [record_json(r) for r in records],
        "sweeps": [sweep_json(s) for s in registry.recent_sweeps(5)],
        "failed_triggers": [{"at": iso_utc(at), "run_id": run_id, "source": source,
                             "error": error}
                            for at, run_id, source, error in registry.failed_triggers(5)],
        "backlog": backlog(settings),
    }
    return data, records


def sweep_json(sweep: dict[str, Any]) -> dict[str, Any]:
    return {**sweep, "started_at": iso_utc(sweep["started_at"]),
            "updated_at": iso_utc(sweep["updated_at"])}


def find_sweep(registry: RunRegistry, sweep_id: str) -> dict[str, Any] | None:
    """An orphan sweep by the task id `statesweep orphans` printed, or by its run id."""
    for candidate in (sweep_id, f"orphans-{sweep_id}"):
        sweep = registry.get_sweep(candidate)
        if sweep is not None:
            return sweep
    return None


@click.command()
@click.argument("run_id", required=False)
@click.option("--follow", is_flag=True,
              help="Follow RUN_ID (or, without it, the active run) to its end.")
@click.option("--limit", type=click.IntRange(1, 200), default=10, show_default=True,
              help="Recent runs to list.")
@FORMAT
@click.pass_context
def status(ctx: click.Context, run_id: str | None, follow: bool, limit: int, fmt: str) -> None:
    """The active and recent runs, pause, recent orphan sweeps and failed triggers, and the
    backlog of expired rows; or one run (or orphan sweep) by RUN_ID."""
    from workers.cli import render, stalls
    from workers.cli.progress import ProgressBar, follow_run

    settings = load_settings(is_verbose(ctx))
    if run_id is None and not follow:
        data, records = overview(settings, limit)
        echo_json(data) if fmt == "json" else click.echo(render.status(data, records))
        return
    registry = shared_run_store(settings)
    if run_id is None:
        run_id = registry.active_run()
        if run_id is None:
            raise NotFound("--follow without a RUN_ID follows the active run, and no run is "
                           "active (`statesweep status` lists recent runs)")
        click.echo(f"following the active run {run_id}", err=True)
    record = registry.get(run_id)
    if record is None:
        sweep = find_sweep(registry, run_id)
        if sweep is None:
            find_run(settings, registry, run_id)  # raises NotFound, naming the id
        assert sweep is not None
        echo_json(sweep_json(sweep)) if fmt == "json" else click.echo(render.sweep(sweep))
        return
    if follow and not record.ended:
        from workers.cli.watch import watch_run

        with watch_run(settings.effective_run_store_url, settings.key_prefix, run_id) as watch:
            record = follow_run(registry, run_id, ProgressBar(f"run {run_id}"),
                                settings=settings, watch=watch)
    now = stalls.condition(settings, registry, record)
    tables = db_clean_tables(registry, record)
    if fmt == "json":
        echo_json({**record_json(record), "condition": now.as_dict(),
                   **({"tables": tables} if tables else {})})
    else:
        click.echo(render.run_detail(record, now))
        for t in tables:  # a db-clean run: each table's progress and archive
            what = (f"FAILED ({t['failed']})" if t["failed"] else
                    f"skipped ({t['skipped']})" if t["skipped"] else t["state"] or "waiting")
            archive = f", archive {t['archive']}" if t["archive"] else ""
            click.echo(f"  {t['table']:<28}{what}: {t['deleted']:,} of {t['eligible']:,} rows, "
                       f"{t['chunks']} chunks{archive}")


def db_clean_tables(registry: RunRegistry, record: RunRecord) -> list[dict[str, Any]]:
    """Each table of a db-clean run (workers.dbclean.store); none for a cleanup run."""
    from workers.dbclean.store import KIND, DbCleanStore

    return DbCleanStore(registry).tables(record.run_id) if record.kind == KIND else []
