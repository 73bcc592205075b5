"""What `statesweep status` reports: the active run, recent runs and the backlog of expired
rows. Runs come from the shared run store; the backlog is one indexed count on the database."""

from __future__ import annotations

from typing import Any

import click

from workers import cleanup
from workers.cli.base import FORMAT, echo_json, is_verbose, load_settings, record_json
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
    """Expired rows waiting for a run, at the database's now(); the error text if unreachable."""
    from sqlalchemy.exc import SQLAlchemyError

    from workers.exceptions import SchemaError

    try:
        with database(settings) as (engine, tables):
            now = cleanup.read_cutoff(engine)
            count = cleanup.count_expired(engine, tables, now)
            return {"table": tables.task_state.name, "now": now.isoformat(),
                    "expired_rows": count}
    except (SQLAlchemyError, SchemaError) as exc:
        reason = getattr(exc, "orig", None) or exc
        return {"error": f"{type(reason).__name__}: {str(reason).strip().splitlines()[0]}"}


def overview(settings: Settings, limit: int) -> tuple[dict[str, Any], list[RunRecord]]:
    registry = shared_run_store(settings)
    records = registry.recent(limit)
    data = {
        "active_run_id": registry.active_run() or "",
        "runs": [record_json(r) for r in records],
        "backlog": backlog(settings),
    }
    return data, records


def detail(settings: Settings, run_id: str) -> tuple[RunRegistry, RunRecord]:
    registry = shared_run_store(settings)
    return registry, find_run(settings, registry, run_id)


@click.command()
@click.argument("run_id", required=False)
@click.option("--follow", is_flag=True, help="With RUN_ID: follow it to its end.")
@click.option("--limit", type=click.IntRange(1, 200), default=10, show_default=True,
              help="Recent runs to list.")
@FORMAT
@click.pass_context
def status(ctx: click.Context, run_id: str | None, follow: bool, limit: int, fmt: str) -> None:
    """The active and recent runs and the backlog of expired rows; or one run by RUN_ID."""
    from workers.cli import render
    from workers.cli.progress import ProgressBar, follow_run
    from workers.exceptions import InvalidArgument

    settings = load_settings(is_verbose(ctx))
    if run_id is None:
        if follow:
            raise InvalidArgument("--follow needs a RUN_ID")
        data, records = overview(settings, limit)
        echo_json(data) if fmt == "json" else click.echo(render.status(data, records))
        return
    registry, record = detail(settings, run_id)
    if follow and record.state not in ("finished", "failed"):
        record = follow_run(registry, run_id, ProgressBar(f"run {run_id}"))
    echo_json(record_json(record)) if fmt == "json" else click.echo(render.run_summary(record))
