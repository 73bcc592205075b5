"""The ``statesweep`` command line. Data goes to stdout; progress and logs go to stderr.

One top-level handler turns a statesweep error into its cause chain on stderr and a named exit
code; nothing is deleted when settings or arguments are bad, because they are checked first.
The commands are thin: cleanup, cleanup-task-states and orphans are in workers.cli_cleanup;
the work lives in workers.cli_runs, cli_status, doctor and demo.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from workers.cli_cleanup import cleanup, cleanup_task_states, orphans
from workers.cli_common import FORMAT, echo_json, is_verbose, load_settings
from workers.cli_seed import seed_command
from workers.demo import DEFAULT_DB
from workers.exceptions import InvalidArgument, NotFound, RefusedError, SchemaError, SettingsError
from workers.exit_codes import (  # noqa: F401 - re-exported: the CLI exits with these
    EXIT_BAD_ARGUMENT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SCHEMA,
    EXIT_SETTINGS,
    EXIT_UNAVAILABLE,
    EXIT_UNHEALTHY,
    EXIT_USAGE,
)
from workers.exporter import exporter_command


def _exit_for(exc: BaseException) -> int | None:
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from sqlalchemy.exc import OperationalError

    from workers.cli_progress import FollowInterrupted
    from workers.cli_runs import RunFailed
    from workers.cli_services import ServiceUnavailable
    from workers.demo import DemoError

    for kind, code in (
        (SettingsError, EXIT_SETTINGS), (SchemaError, EXIT_SCHEMA), (RefusedError, EXIT_REFUSED),
        (InvalidArgument, EXIT_BAD_ARGUMENT), (NotFound, EXIT_BAD_ARGUMENT),
        (ServiceUnavailable, EXIT_UNAVAILABLE), (OperationalError, EXIT_UNAVAILABLE),
        (KombuOperationalError, EXIT_UNAVAILABLE), (RedisConnectionError, EXIT_UNAVAILABLE),
        (RedisTimeoutError, EXIT_UNAVAILABLE), (FollowInterrupted, EXIT_INTERRUPTED),
        (RunFailed, EXIT_FAILURE), (DemoError, EXIT_FAILURE),
    ):
        if isinstance(exc, kind):
            return code
    return None


def _report(exc: BaseException) -> None:
    from sqlalchemy.exc import OperationalError

    from workers.cli_progress import FollowInterrupted

    if isinstance(exc, OperationalError) and exc.orig is not None:
        exc = exc.orig  # the driver's message; SQLAlchemy's repeats the SQL
    click.echo(str(exc) if isinstance(exc, FollowInterrupted) else f"error: {exc}", err=True)
    shown = str(exc)
    cause = _cause(exc)
    while cause is not None:
        if str(cause) != shown:  # drivers often wrap an error in one with the same text
            click.echo(f"  caused by {type(cause).__name__}: {cause}", err=True)
            shown = str(cause)
        cause = _cause(cause)


def _cause(exc: BaseException) -> BaseException | None:
    """The explicit cause, else the implicit context unless `raise ... from None` hid it."""
    if exc.__cause__ is not None or exc.__suppress_context__:
        return exc.__cause__
    return exc.__context__


class StatesweepGroup(click.Group):
    """The top-level handler: a known error becomes its cause chain and a named exit code.
    Here rather than in main() so tests driving the group with click's CliRunner see it too."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            code = _exit_for(exc)
            if code is None:
                raise
            _report(exc)
            ctx.exit(code)


@click.group(cls=StatesweepGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log at STATESWEEP_LOG_LEVEL, not WARNING.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """statesweep: garbage-collect Airflow's task_state and asset_state tables."""
    ctx.obj = {"verbose": verbose}


cli.add_command(cleanup)
cli.add_command(cleanup_task_states)
cli.add_command(orphans)
cli.add_command(seed_command)  # sample data: compose's demo-data profile
cli.add_command(exporter_command)  # long-running: Prometheus metrics (workers.exporter)


@cli.group()
def db() -> None:
    """Manage the standalone schema (never an Airflow database)."""


@db.command("upgrade")
@click.option("--naming", type=click.Choice(["seed", "airflow"]), default="seed",
              show_default=True, help="Table names to create.")
def db_upgrade(naming: str) -> None:
    """Create the standalone state-store schema on an empty database."""
    from workers.db import make_engine
    from workers.schema import upgrade
    from workers.settings import mask_url

    settings = load_settings()
    engine = make_engine(settings.database_url)
    try:
        created = upgrade(engine, naming)
    finally:
        engine.dispose()
    where = mask_url(settings.database_url)
    if created:
        click.echo(f"created {', '.join(created)} in {where}")
    else:
        click.echo(f"schema already up to date in {where}")


@cli.command()
@click.argument("run_id", required=False)
@click.option("--follow", is_flag=True, help="With RUN_ID: follow it to its end.")
@click.option("--limit", type=click.IntRange(1, 200), default=10, show_default=True,
              help="Recent runs to list.")
@FORMAT
@click.pass_context
def status(ctx: click.Context, run_id: str | None, follow: bool, limit: int, fmt: str) -> None:
    """The active and recent runs and the backlog of expired rows; or one run by RUN_ID."""
    from workers import cli_render, cli_status
    from workers.cli_progress import ProgressBar, follow_run

    settings = load_settings(is_verbose(ctx))
    if run_id is None:
        if follow:
            raise InvalidArgument("--follow needs a RUN_ID")
        data, records = cli_status.overview(settings, limit)
        echo_json(data) if fmt == "json" else click.echo(cli_render.status(data, records))
        return
    registry, record = cli_status.detail(settings, run_id)
    if follow and record.state not in ("finished", "failed"):
        record = follow_run(registry, run_id, ProgressBar(f"run {run_id}"))
    echo_json(record.as_dict()) if fmt == "json" else click.echo(cli_render.run_summary(record))


@cli.command()
@FORMAT
@click.pass_context
def doctor(ctx: click.Context, fmt: str) -> None:
    """Check database, schema, index, broker, workers and run store; show settings (masked)."""
    from workers import doctor as checks

    settings = load_settings(is_verbose(ctx))
    data = checks.report(checks.run_checks(settings), settings)
    echo_json(data) if fmt == "json" else click.echo(checks.render(data))
    if not data["healthy"]:
        ctx.exit(EXIT_UNHEALTHY)


@cli.command()
@click.option("--rows", type=click.IntRange(min=0), default=100_000, show_default=True,
              help="Task state rows to seed.")
@click.option("--db", "db_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path(DEFAULT_DB), show_default=True,
              help="SQLite file, recreated each time.")
@click.pass_context
def demo(ctx: click.Context, rows: int, db_path: Path) -> None:
    """The whole pipeline with no services: SQLite, an in-memory broker, an in-process worker."""
    from workers.demo import render, run_demo
    from workers.logs import configure_logging

    configure_logging("console", "INFO", force=True)
    result = run_demo(rows, db_path)
    click.echo(render(result))
    if not result.ok:
        ctx.exit(EXIT_FAILURE)


def _fail(exc: BaseException, code: int) -> NoReturn:
    _report(exc)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the CLI with statesweep's error handling."""
    try:
        rv = cli.main(args=argv, prog_name="statesweep", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:
        code = _exit_for(exc)
        if code is None:
            raise
        _fail(exc, code)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    main()
