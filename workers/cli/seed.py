"""``statesweep seed``: sample rows for a demo deployment (compose's ``demo-data`` profile).

It writes only into a standalone schema that ``statesweep db upgrade`` created (the
``statesweep_schema`` marker table is there), never into an Airflow metadata database or one
holding tables statesweep did not create. Rows are relative to the database clock, so the
expired ones are expired for the next cleanup run.
"""

from __future__ import annotations

import json

import click
from sqlalchemy import Engine, func, inspect, select

from workers.cli.base import load_settings
from workers.exceptions import InvalidArgument, RefusedError
from workers.schema import Tables


def rows_present(engine: Engine, tables: Tables) -> dict[str, int]:
    """Row counts of the tables the seed writes, the non-empty ones only."""
    counts = {}
    with engine.connect() as conn:
        for table in (tables.dag_run, tables.task_state, tables.asset, tables.asset_state):
            n = int(conn.execute(select(func.count()).select_from(table)).scalar_one())
            if n:
                counts[table.name] = n
    return counts


def last_task_state_id(engine: Engine, tables: Tables) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.max(tables.task_state.c.id))).scalar_one() or 0)


@click.command("seed")
@click.option("--rows", type=int, default=100_000, show_default=True,
              help="Task state rows to write (about 55% expired, 10% never expiring).")
@click.option("--if-empty", is_flag=True,
              help="Do nothing (exit 0) when the schema already holds data, "
                   "so a one-shot container can run again.")
@click.option("--add", is_flag=True,
              help="Add the rows after those already there (a schema statesweep created "
                   "and seeded), e.g. to give the next run more to delete.")
def seed_command(rows: int, if_empty: bool, add: bool) -> None:
    """Fill the standalone schema with sample task and asset state."""
    from workers.db import db_now, make_engine
    from workers.schema import AIRFLOW_MARKERS, OWN_MARKER, resolve_tables
    from workers.seed import SeedSpec, seed

    if rows < 0:
        raise InvalidArgument(f"--rows must be 0 or a positive number of rows, got {rows}")
    if add and if_empty:
        raise InvalidArgument("--add and --if-empty contradict each other; pass one")
    settings = load_settings()
    where = settings.database_origin
    engine = make_engine(settings.database_url)
    try:
        existing = set(inspect(engine).get_table_names())
        airflow = sorted(existing & set(AIRFLOW_MARKERS))
        if airflow:
            raise RefusedError(f"refusing to seed {where}: it holds an Airflow schema "
                               f"(found {', '.join(airflow)})")
        if OWN_MARKER not in existing:
            raise RefusedError(f"refusing to seed {where}: run 'statesweep db upgrade' first; "
                               "only a schema statesweep created is seeded")
        tables = resolve_tables(engine, settings.table_naming)
        present = rows_present(engine, tables)
        first_row = 0
        if present and add:
            first_row = last_task_state_id(engine, tables)
        elif present:
            held = ", ".join(f"{name}: {n} rows" for name, n in present.items())
            if if_empty:
                click.echo(f"already seeded ({held}); nothing to do", err=True)
                return
            raise RefusedError(f"refusing to seed {where}: it already holds data ({held}); "
                               "pass --if-empty to skip quietly, or --add to add rows")
        with engine.connect() as conn:
            now = db_now(conn)
        counts = seed(engine, tables, SeedSpec(rows=rows, first_row=first_row), now)
    finally:
        engine.dispose()
    added = f" after id {first_row}" if first_row else ""
    click.echo(f"seeded {rows} task state rows into {where}{added}", err=True)
    click.echo(json.dumps({
        "rows": rows, "first_id": first_row + 1, "expired": counts.expired, "never": counts.never,
        "future": counts.future, "asset_rows_live": counts.asset_rows_live,
        "asset_rows_orphaned": counts.asset_rows_orphaned,
    }, sort_keys=True))
