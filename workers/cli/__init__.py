"""The ``statesweep`` command line, laid out like Celery's ``celery/bin/``: one module per
command or command group over a shared :mod:`workers.cli.base`. Data goes to stdout; progress
and logs go to stderr.

- ``base``: settings loading, common options, JSON output, and the top-level handler that turns
  a statesweep error into one message (its explaining causes) and a named exit code.
- commands: ``cleanup`` (cleanup, cleanup-task-states, orphans), ``status``, ``control``
  (pause, resume, abort), ``doctor``,
  ``seed``, ``db`` (db upgrade), ``demo``, ``flower`` (Flower, refusing to start without auth).
- helpers beside them: ``dispatch`` (sending, following and running runs), ``services``
  (reaching database, broker and run store with short timeouts), ``render`` (text on stdout),
  ``progress`` (the progress bar on stderr), ``stalls`` (queued, held or stalled runs).

Imports go one way: the CLI imports the pipeline (``workers.coordinator``, ``workers.runs``, …),
never the reverse.

Adding a command: write ``workers/cli/<name>.py`` defining a click command (or group) that reads
its settings with ``base.load_settings(is_verbose(ctx))`` inside the command, raises a
``workers.exceptions`` error for bad input (the handler maps it to its exit code), and imports
heavy modules (Celery, the database) inside the function so ``statesweep --help`` stays fast;
then add its name to ``COMMANDS`` below. A new exit code goes in ``workers.exit_codes`` and its
exception in ``base.EXIT_FOR``.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import sys
from typing import Any

import click

from workers.cli.base import StatesweepGroup, exit_for, report, version
from workers.exit_codes import (  # noqa: F401 - re-exported: the CLI exits with these
    EXIT_ABORTED,
    EXIT_BAD_ARGUMENT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SCHEMA,
    EXIT_SETTINGS,
    EXIT_STUCK,
    EXIT_UNAVAILABLE,
    EXIT_UNHEALTHY,
    EXIT_USAGE,
)

# (module in workers.cli, attribute): each is a click command or group added to `statesweep`.
COMMANDS = (
    ("cleanup", "cleanup"),
    ("cleanup", "cleanup_task_states"),
    ("cleanup", "orphans"),
    ("seed", "seed_command"),  # sample data: compose's demo-data profile
    ("db", "db"),
    ("status", "status"),
    ("control", "pause"),  # pause / resume / abort: the operator's controls
    ("control", "resume"),
    ("control", "abort"),
    ("doctor", "doctor"),
    ("demo", "demo"),
    ("flower", "flower"),
    ("exporter", "exporter_command"),  # long-running: Prometheus metrics
    ("dbclean", "db_clean"),  # airflow db clean over Airflow's metadata tables, archived
)


class LazyGroup(StatesweepGroup):
    """The top-level group, importing a command's module only when that command runs: each
    module imports what its commands need, and `statesweep cleanup --wait` should not pay for
    doctor's or the exporter's imports. Listing commands (``--help``, ``.commands``) loads
    them all."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loaded: set[str] = set()
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def commands(self) -> dict[str, click.Command]:
        for module, _attr in COMMANDS:
            self._load(module)
        return self._commands

    @commands.setter
    def commands(self, value: dict[str, click.Command]) -> None:
        self._commands = value

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        self._commands[name or cmd.name or ""] = cmd  # not through .commands: that loads all

    def _load(self, module: str) -> None:
        if module in self._loaded:
            return
        self._loaded.add(module)
        imported = importlib.import_module(f"workers.cli.{module}")
        for name, attr in COMMANDS:
            if name == module:
                self.add_command(getattr(imported, attr))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        # The module named like the command, or defining an attribute named like it
        # (cleanup-task-states: cleanup_task_states; seed: seed_command); else all of them.
        for module, attr in COMMANDS:
            if cmd_name in (module, attr.removesuffix("_command").replace("_", "-")):
                self._load(module)
        if cmd_name not in self._commands:
            return self.commands.get(cmd_name)
        return self._commands[cmd_name]

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.commands)


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log at STATESWEEP_LOG_LEVEL, not WARNING.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=lambda ctx, _param, value: _show_version(ctx, value),
              help="Show the version and exit.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """statesweep: garbage-collect Airflow's task_state and asset_state tables."""
    ctx.obj = {"verbose": verbose}


def _show_version(ctx: click.Context, value: bool) -> None:
    # Not click.version_option(version()): importlib.metadata at import costs every command.
    if value and not ctx.resilient_parsing:
        click.echo(f"statesweep {version()}")
        ctx.exit()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the CLI with statesweep's error handling."""
    # The interpreter's last garbage collections walk every object Celery, kombu and redis
    # left: a third of a second of an empty `cleanup --wait` on a busy host, after the command
    # has said everything. Frozen, the objects still go; only the search for cycles is skipped.
    atexit.register(gc.freeze)
    try:
        rv = cli.main(args=argv, prog_name="statesweep", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:
        code = exit_for(exc)
        if code is None:
            raise
        report(exc)
        sys.exit(code)
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    main()
