"""The ``statesweep`` command line. Data goes to stdout; progress and logs go to stderr.

One top-level handler turns a statesweep error into its cause chain on stderr and a named exit
code; nothing is deleted when settings or arguments are bad, because they are checked first.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

from workers.exceptions import InvalidArgument, NotFound, RefusedError, SchemaError, SettingsError
from workers.settings import Settings

# Exit codes. 1 is left to Python and click for unexpected errors.
EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected error; the traceback says where
EXIT_USAGE = 2  # click's own: an unknown option or a missing argument
EXIT_SETTINGS = 3  # a STATESWEEP_* / AIRFLOW__* setting is invalid
EXIT_SCHEMA = 4  # the database lacks the tables or columns statesweep needs
EXIT_REFUSED = 5  # statesweep refused to act (e.g. alter an Airflow database)
EXIT_BAD_ARGUMENT = 6  # an argument is invalid, or names a run that does not exist
EXIT_UNHEALTHY = 7  # `doctor` found a problem
EXIT_UNAVAILABLE = 8  # a database, broker or run store could not be reached

_EXIT_FOR = (
    (SettingsError, EXIT_SETTINGS),
    (SchemaError, EXIT_SCHEMA),
    (RefusedError, EXIT_REFUSED),
    (InvalidArgument, EXIT_BAD_ARGUMENT),
    (NotFound, EXIT_BAD_ARGUMENT),
)


def load_settings() -> Settings:
    return Settings.from_env()


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, sort_keys=True))


@click.group()
def cli() -> None:
    """statesweep: garbage-collect Airflow's task_state and asset_state tables."""


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


def _fail(exc: BaseException, code: int) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        click.echo(f"  caused by {type(cause).__name__}: {cause}", err=True)
        cause = cause.__cause__ or cause.__context__
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the CLI with statesweep's error handling."""
    from sqlalchemy.exc import OperationalError

    try:
        rv = cli.main(args=argv, prog_name="statesweep", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except OperationalError as exc:
        _fail(exc.orig if exc.orig is not None else exc, EXIT_UNAVAILABLE)
    except Exception as exc:
        for kind, code in _EXIT_FOR:
            if isinstance(exc, kind):
                _fail(exc, code)
        raise
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    main()
