"""``statesweep db-clean``: Airflow's ``airflow db clean`` over its metadata tables, each chunk
archived and deleted in one transaction (workers.dbclean), and its archives: ``db-clean
archives`` (list), ``db-clean export`` (CSV/JSON), ``db-clean drop``.

Without ``--local`` the run goes to the workers (workers.dbclean.tasks) and the command waits
for it to end (workers.cli.dbclean_wait), printing the same report. Options are spelled as
Airflow spells them. Every argument is checked before the database is
touched: a bad one is one line naming it and its value, exit 6, nothing deleted.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from workers.cli.base import FORMAT, check_batch_option, echo_json, is_verbose, load_settings
from workers.exceptions import InvalidArgument, RefusedError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from workers.dbclean.run import Report

R = TypeVar("R")
CONFIRM = "delete rows"
CONFIRM_DROP = "drop archived tables"


def _before(value: str | None) -> dt.datetime:
    from workers.selection import _timestamp

    if not value:
        raise InvalidArgument("--clean-before-timestamp is required: the time before which "
                              "rows are purged (ISO-8601, e.g. 2026-12-01T00:00:00+00:00)")
    try:
        when = _timestamp(value)
    except InvalidArgument:
        raise InvalidArgument(f"--clean-before-timestamp is not an ISO-8601 timestamp: "
                              f"{value!r} (e.g. 2026-12-01T00:00:00+00:00)") from None
    assert when is not None
    return when


def _dag_ids(option: str, value: str | None) -> tuple[str, ...]:
    from workers.selection import _dag_ids as parse

    try:
        return parse(option, value)
    except InvalidArgument as exc:
        raise InvalidArgument(str(exc)) from None


def _confirm(question: str, answer: str) -> None:
    """Airflow's confirmation: the exact phrase on stdin, or nothing happens."""
    click.echo(f"{question}\nEnter '{answer}' (without quotes) to proceed.", err=True)
    given = sys.stdin.readline().strip()
    if given != answer:
        raise RefusedError(f"not confirmed (expected {answer!r}); nothing was deleted")


@click.group("db-clean", invoke_without_command=True)
@click.option("--clean-before-timestamp", default=None, metavar="TIMESTAMP",
              help="Purge rows older than this (ISO-8601; UTC if no offset). Required.")
@click.option("--tables", default=None, metavar="TABLES",
              help="Only these tables (comma-separated) and their dependants.")
@click.option("--dag-ids", default=None, metavar="IDS", help="Only rows of these dag ids.")
@click.option("--exclude-dag-ids", default=None, metavar="IDS", help="Not rows of these dag ids.")
@click.option("--dry-run", is_flag=True, help="Count the rows each table would lose; delete "
                                               "nothing.")
@click.option("--skip-archive", is_flag=True, help="Keep no copy: no archive table is made.")
@click.option("--batch-size", type=int, default=None,
              help="Rows per chunk (one transaction each) [default: "
                   "STATESWEEP_CLEANUP_BATCH_SIZE]; 0 = one chunk per table.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--local", is_flag=True, help="Run the chunks in this process (default: on the "
                                            "workers, waiting for the run to end).")
@FORMAT
@click.pass_context
def db_clean(ctx: click.Context, clean_before_timestamp: str | None, tables: str | None,
             dag_ids: str | None, exclude_dag_ids: str | None, dry_run: bool,
             skip_archive: bool, batch_size: int | None, yes: bool, local: bool,
             fmt: str) -> None:
    """Purge old rows of Airflow's metadata tables, as `airflow db clean`, archiving each chunk
    in the transaction that deletes it."""
    if ctx.invoked_subcommand is not None:
        return
    from workers.dbclean import run
    from workers.dbclean.rules import parse_tables

    before = _before(clean_before_timestamp)
    names = parse_tables(tables)
    only = _dag_ids("--dag-ids", dag_ids)
    excluded = _dag_ids("--exclude-dag-ids", exclude_dag_ids)
    check_batch_option(batch_size)
    settings = load_settings(is_verbose(ctx))
    request = run.Request(before, names, only, excluded,
                          settings.cleanup_batch_size if batch_size is None else batch_size,
                          skip_archive, dry_run, settings.protect_unfinished_dag_runs,
                          settings.lock_timeout_ms, settings.statement_timeout_ms)
    from workers.db import make_engine

    engine = make_engine(settings.database_url)
    try:
        version, rules = run.plan(engine, request)  # bad --tables fails before the prompt
        if not dry_run and not yes:
            _confirm(f"You have requested that we purge all data prior to {before.isoformat()} "
                     f"from {', '.join(r.table for r in rules)} (Airflow {version}"
                     f"{', dag ids ' + ', '.join(only) if only else ''}"
                     f"{', excluding ' + ', '.join(excluded) if excluded else ''}). "
                     "This is irreversible.", CONFIRM)

        def progress(result: run.TableResult) -> None:
            click.echo(f"{result.table}: {result.deleted:,} of {result.eligible:,} rows, "
                       f"{result.chunks} chunks", err=True)

        if local or dry_run:
            report = run.clean(engine, request, on_progress=progress if not dry_run else None)
        else:
            from workers.cli.dbclean_wait import dispatch_and_wait

            report = dispatch_and_wait(settings, request, version)
    finally:
        engine.dispose()
    if fmt == "json":
        echo_json(report.as_dict())
    else:
        _print_report(report, dry_run)
    failed = [t for t in report.tables if t.failed]
    if failed:
        from workers.cli.dispatch import RunFailed

        raise RunFailed(f"db-clean: {len(failed)} table(s) failed, the others were cleaned: "
                        + "; ".join(f"{t.table}: {t.failed}" for t in failed))


def _print_report(report: Report, dry_run: bool) -> None:
    verb = "would delete" if dry_run else "deleted"
    for t in report.tables:
        if t.failed:
            click.echo(f"{t.table}: FAILED after {t.deleted:,} rows ({t.failed})")
        elif t.skipped:
            click.echo(f"{t.table}: skipped ({t.skipped})")
        elif dry_run:
            click.echo(f"{t.table}: {verb} {t.eligible:,} rows")
        else:
            where = f", archived in {t.archive}" if t.archive else ""
            click.echo(f"{t.table}: {verb} {t.deleted:,} rows in {t.chunks} chunks{where}")


@db_clean.command("archives")
@click.option("--tables", default=None, metavar="TABLES", help="Only archives of these tables.")
@FORMAT
def archives_command(tables: str | None, fmt: str) -> None:
    """List archive tables (_airflow_deleted__<table>__<time>) and their rows."""
    from workers.dbclean import archives
    from workers.dbclean.rules import parse_tables

    found = _with_engine(lambda e: archives.list_archives(e, parse_tables(tables)))
    if fmt == "json":
        echo_json([a.__dict__ for a in found])
        return
    for a in found:
        click.echo(f"{a.name}\t{a.source}\t{a.rows}")


@db_clean.command("export")
@click.option("--export-format", type=click.Choice(["csv", "json"]), default="csv",
              show_default=True, help="File format.")
@click.option("--output-path", required=True, metavar="DIR",
              help="An existing directory; one <archive>.<format> file per archive.")
@click.option("--tables", default=None, metavar="TABLES", help="Only archives of these tables.")
@click.option("--drop-archives", is_flag=True, help="Drop each archive once exported.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask before dropping.")
def export_command(export_format: str, output_path: str, tables: str | None,
                   drop_archives: bool, yes: bool) -> None:
    """Export archive tables to files (Airflow's `db export-archived`)."""
    from workers.dbclean import archives
    from workers.dbclean.rules import parse_tables

    out = Path(output_path)
    if not out.is_dir():
        raise InvalidArgument(f"--output-path is not an existing directory: {output_path!r}")
    names = parse_tables(tables)

    def work(engine: Engine) -> None:
        found = archives.list_archives(engine, names)
        if drop_archives and found and not yes:
            _confirm(f"You have requested that we drop {len(found)} archive tables after "
                     "exporting them. This is irreversible.", CONFIRM_DROP)
        for a in found:
            path = out / f"{a.name}.{export_format}"
            rows = archives.export(engine, a.name, path, export_format)
            click.echo(f"{a.name}: {rows} rows -> {path}")
            if drop_archives:
                archives.drop(engine, a.name)
                click.echo(f"{a.name}: dropped")

    _with_engine(work)


@db_clean.command("drop")
@click.option("--tables", default=None, metavar="TABLES", help="Only archives of these tables.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def drop_command(tables: str | None, yes: bool) -> None:
    """Drop archive tables (Airflow's `db drop-archived`)."""
    from workers.dbclean import archives
    from workers.dbclean.rules import parse_tables

    names = parse_tables(tables)

    def work(engine: Engine) -> None:
        found = archives.list_archives(engine, names)
        if found and not yes:
            _confirm(f"You have requested that we drop {len(found)} archive tables: "
                     f"{', '.join(a.name for a in found)}. This is irreversible.", CONFIRM_DROP)
        for a in found:
            archives.drop(engine, a.name)
            click.echo(f"{a.name}: dropped")

    _with_engine(work)


def _with_engine(work: Callable[[Engine], R]) -> R:
    from workers.db import make_engine

    settings = load_settings()
    engine = make_engine(settings.database_url)
    try:
        return work(engine)
    finally:
        engine.dispose()
