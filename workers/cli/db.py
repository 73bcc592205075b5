"""``statesweep db``: the standalone schema (never an Airflow database)."""

from __future__ import annotations

import click

from workers.cli.base import load_settings


@click.group()
def db() -> None:
    """Manage the standalone schema (never an Airflow database)."""


@db.command("upgrade")
@click.option("--naming", type=click.Choice(["seed", "airflow"]), default="seed",
              show_default=True, help="Table names to create.")
def db_upgrade(naming: str) -> None:
    """Create the standalone state-store schema on an empty database."""
    from workers.db import make_engine
    from workers.schema import upgrade

    settings = load_settings()
    engine = make_engine(settings.database_url)
    try:
        created = upgrade(engine, naming)
    finally:
        engine.dispose()
    where = settings.database_origin
    if created:
        click.echo(f"created {', '.join(created)} in {where}")
    else:
        click.echo(f"schema already up to date in {where}")
