"""What every statesweep command shares: settings read inside the command (so the top-level
handler reports a bad one), logging to stderr, JSON on stdout, and the common options."""

from __future__ import annotations

import json
from typing import Any

import click

from workers.exceptions import InvalidArgument
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


def check_batch_option(batch_size: int | None) -> int | None:
    if batch_size is not None and batch_size < 0:
        raise InvalidArgument(
            f"--batch-size must be 0 (one chunk) or a positive number of rows, got {batch_size}")
    return batch_size


FORMAT = click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
                      show_default=True, help="Output on stdout.")
BATCH = click.option("--batch-size", type=int, default=None,
                     help="Rows per chunk [default: STATESWEEP_CLEANUP_BATCH_SIZE]; 0 = one.")


def is_verbose(ctx: click.Context) -> bool:
    """Whether the top-level ``--verbose`` (or a command's own) was given."""
    return bool((ctx.find_root().obj or {}).get("verbose"))
