"""What every statesweep command shares: settings read inside the command (so the top-level
handler reports a bad one), logging to stderr, JSON on stdout, the common options, and the
handler that turns a statesweep error into its message and a named exit code."""

from __future__ import annotations

import json
from typing import Any

import click

from workers.exceptions import InvalidArgument
from workers.runs import RunRecord
from workers.settings import Settings


def load_settings(verbose: bool = False) -> Settings:
    """Settings from the environment, read inside the command so a bad one is reported by the
    handler; logs go to stderr, WARNING and up unless --verbose."""
    from workers.logs import configure_logging

    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level if verbose else "WARNING",
                      force=True)
    return settings


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, sort_keys=True))


def iso_utc(ts: float) -> str | None:
    """An epoch time as ISO-8601 UTC, the one time format of JSON output (the run store keeps
    floats; cutoffs and the database clock are already ISO-8601 UTC)."""
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat() if ts else None


def record_json(record: RunRecord) -> dict[str, Any]:
    """A run as JSON: its times as ISO-8601 UTC (null when not reached yet)."""
    data = record.as_dict()
    for key, value in data.items():
        if key.endswith(("_at", "_since")) and isinstance(value, int | float):
            data[key] = iso_utc(float(value))
    return data


def check_batch_option(batch_size: int | None) -> int | None:
    """--batch-size checked before anything else runs: one line naming it and the value."""
    from workers.settings import check_batch_size_value

    if batch_size is not None:
        try:
            check_batch_size_value(batch_size, "--batch-size")
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
    return batch_size


def require_privileges(settings: Settings, table: str) -> None:
    """Before a local run deletes: the database user may SELECT and DELETE *table* (a Tables
    attribute, ``task_state`` or ``asset_state``); else one line naming the user, what it
    lacks and the GRANT, exit 4 (workers.privileges)."""
    from workers.cli.services import database
    from workers.privileges import check_privileges

    with database(settings) as (engine, tables):
        check_privileges(engine, [getattr(tables, table)], settings.database_origin)


FORMAT = click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
                      show_default=True, help="Output on stdout.")
BATCH = click.option("--batch-size", type=int, default=None,
                     help="Rows per chunk [default: STATESWEEP_CLEANUP_BATCH_SIZE]; 0 = one.")


def is_verbose(ctx: click.Context) -> bool:
    """Whether the top-level ``--verbose`` (or a command's own) was given."""
    return bool((ctx.find_root().obj or {}).get("verbose"))


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("statesweep")
    except PackageNotFoundError:  # pragma: no cover - running from a checkout, not installed
        return "unknown"


# --- the top-level handler ----------------------------------------------------------------------


def exit_for(exc: BaseException) -> int | None:
    """The exit code of a known error; None for an unexpected one (its traceback is shown)."""
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from sqlalchemy.exc import OperationalError

    from workers.cli.demo import DemoError
    from workers.cli.dispatch import RunAborted, RunFailed
    from workers.cli.progress import FollowInterrupted, RunStuck
    from workers.cli.services import ServiceUnavailable
    from workers.exceptions import NotFound, RefusedError, SchemaError, SettingsError
    from workers.exit_codes import (
        EXIT_ABORTED,
        EXIT_BAD_ARGUMENT,
        EXIT_FAILURE,
        EXIT_INTERRUPTED,
        EXIT_REFUSED,
        EXIT_SCHEMA,
        EXIT_SETTINGS,
        EXIT_STUCK,
        EXIT_UNAVAILABLE,
    )
    from workers.privileges import denied

    if denied(exc) is not None:  # before OperationalError: MySQL's 1142 is one
        return EXIT_SCHEMA
    for kind, code in (
        (SettingsError, EXIT_SETTINGS), (SchemaError, EXIT_SCHEMA), (RefusedError, EXIT_REFUSED),
        (InvalidArgument, EXIT_BAD_ARGUMENT), (NotFound, EXIT_BAD_ARGUMENT),
        (ServiceUnavailable, EXIT_UNAVAILABLE), (OperationalError, EXIT_UNAVAILABLE),
        (KombuOperationalError, EXIT_UNAVAILABLE), (RedisConnectionError, EXIT_UNAVAILABLE),
        (RedisTimeoutError, EXIT_UNAVAILABLE), (FollowInterrupted, EXIT_INTERRUPTED),
        (RunFailed, EXIT_FAILURE), (DemoError, EXIT_FAILURE), (RunAborted, EXIT_ABORTED),
        (RunStuck, EXIT_STUCK),
    ):
        if isinstance(exc, kind):
            return code
    return None


def report(exc: BaseException) -> None:
    """The error on stderr, then each cause that adds to it."""
    from sqlalchemy.exc import OperationalError

    from workers.cli.progress import FollowInterrupted
    from workers.privileges import denied
    from workers.settings import mask_secrets

    privilege = denied(exc, _configured_user())
    if privilege is not None:  # one line: the driver's cause would only repeat it
        click.echo(mask_secrets(f"error: {privilege}"), err=True)
        return
    if isinstance(exc, OperationalError) and exc.orig is not None:
        exc = exc.orig  # the driver's message; SQLAlchemy's repeats the SQL
    message = str(exc) if isinstance(exc, FollowInterrupted) else f"error: {exc}"
    click.echo(mask_secrets(message), err=True)
    shown = str(exc)
    for cause in explaining_causes(exc):
        if str(cause) != shown:  # drivers often wrap an error in one with the same text
            click.echo(mask_secrets(f"  caused by {type(cause).__name__}: {cause}"), err=True)
            shown = str(cause)


def _configured_user() -> str:
    """The database user of the settings in effect ("" if they cannot be read): PostgreSQL's
    privilege errors do not name it."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(Settings.from_env().database_url).username or ""
    except Exception:
        return ""


# Errors raised and handled inside a library while it retried (kombu pops an empty connection
# pool, redis-py's retry loop hits a closed socket); they are how the library got there, not why
# the operation failed, so a cause chain that ends in one stops before it.
_NOISE = (IndexError, KeyError, StopIteration)


def explaining_causes(exc: BaseException) -> list[BaseException]:
    """The chain of causes under *exc*, without bookkeeping errors from library internals."""
    chain: list[BaseException] = []
    cause = _cause(exc)
    while cause is not None and len(chain) < 10:
        if not isinstance(cause, _NOISE) and str(cause).strip():
            chain.append(cause)
        cause = _cause(cause)
    return chain


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
            code = exit_for(exc)
            if code is None:
                raise
            report(exc)
            ctx.exit(code)
