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

from workers.exceptions import RefusedError
from workers.schema import Tables
from workers.settings import Settings, mask_url


def rows_present(engine: Engine, tables: Tables) -> dict[str, int]:
    """Row counts of the tables the seed writes, the non-empty ones only."""
    counts = {}
    with engine.connect() as conn:
        for table in (tables.dag_run, tables.task_state, tables.asset, tables.asset_state):
            n = int(conn.execute(select(func.count()).select_from(table)).scalar_one())
            if n:
                counts[table.name] = n
    return counts


@click.command("seed")
@click.option("--rows", type=click.IntRange(min=0), default=100_000, show_default=True,
              help="Task state rows to write (about 55% expired, 10% never expiring).")
@click.option("--if-empty", is_flag=True,
              help="Do nothing (exit 0) when the schema already holds data, "
                   "so a one-shot container can run again.")
def seed_command(rows: int, if_empty: bool) -> None:
    """Fill the standalone schema with sample task and asset state."""
    from workers.db import db_now, make_engine
    from workers.schema import AIRFLOW_MARKERS, OWN_MARKER, resolve_tables
    from workers.seed import SeedSpec, seed

    settings = Settings.from_env()
    where = mask_url(settings.database_url)
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
        if present:
            held = ", ".join(f"{name}: {n} rows" for name, n in present.items())
            if if_empty:
                click.echo(f"already seeded ({held}); nothing to do", err=True)
                return
            raise RefusedError(f"refusing to seed {where}: it already holds data ({held}); "
                               "pass --if-empty to skip quietly")
        with engine.connect() as conn:
            now = db_now(conn)
        counts = seed(engine, tables, SeedSpec(rows=rows), now)
    finally:
        engine.dispose()
    click.echo(f"seeded {rows} task state rows into {where}", err=True)
    click.echo(json.dumps({
        "rows": rows, "expired": counts.expired, "never": counts.never,
        "future": counts.future, "asset_rows_live": counts.asset_rows_live,
        "asset_rows_orphaned": counts.asset_rows_orphaned,
    }, sort_keys=True))
