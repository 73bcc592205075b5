"""The command line is a package over a shared base, and imports go one way: the pipeline
(every workers module outside workers/cli/) never imports the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import click

WORKERS = Path(__file__).resolve().parents[2] / "workers"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_pipeline_never_imports_the_cli() -> None:
    pipeline = sorted(p for p in WORKERS.glob("*.py"))
    assert len(pipeline) > 5  # the glob found the pipeline modules
    offenders = {p.name: sorted(n for n in _imports(p)
                                if n == "workers.cli" or n.startswith("workers.cli."))
                 for p in pipeline}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_cli_module_is_left_beside_the_pipeline() -> None:
    assert sorted(p.name for p in WORKERS.glob("cli*.py")) == []
    assert not (WORKERS / "doctor.py").exists() and not (WORKERS / "demo.py").exists()


def test_every_command_is_registered_from_its_module() -> None:
    from workers.cli import COMMANDS, cli

    assert set(cli.commands) == {"cleanup", "cleanup-task-states", "orphans", "seed", "db",
                                 "status", "doctor", "demo", "flower", "exporter", "pause",
                                 "resume", "abort", "db-clean"}
    for module, attr in COMMANDS:
        command = getattr(__import__(f"workers.cli.{module}", fromlist=[attr]), attr)
        assert isinstance(command, click.Command)
        assert cli.commands[command.name or ""] is command


def test_the_console_script_is_the_package_main() -> None:
    done = subprocess.run([sys.executable, "-c", "from workers.cli import main; main()",
                           "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("statesweep ")
    pyproject = (WORKERS.parent / "pyproject.toml").read_text()
    assert 'statesweep = "workers.cli:main"' in pyproject


def test_following_polls_soon_then_backs_off_to_the_interval() -> None:
    """A small run ends within tens of milliseconds of its pickup: the first polls come fast,
    then the delay grows 1.5x a step and settles at the poll interval."""
    from itertools import islice

    from workers.cli.progress import FIRST_POLL_SECONDS, poll_delays

    delays = list(islice(poll_delays(0.5), 12))
    assert delays[0] == FIRST_POLL_SECONDS == 0.01
    assert all(b == min(0.5, a * 1.5) for a, b in zip(delays, delays[1:], strict=False))
    assert delays[-1] == 0.5 and max(delays) == 0.5
    assert list(islice(poll_delays(0.005), 3)) == [0.005] * 3  # a cap under the first delay


def test_starting_the_cli_leaves_the_pipeline_and_heavy_libraries_unimported() -> None:
    """An empty `cleanup --wait` is mostly process start and imports: the CLI's top level loads
    neither the pipeline it dispatches to nor the database driver, Celery, structlog or the
    exporter's prometheus_client (each command imports what it uses)."""
    heavy = ("workers.chunk", "workers.coordinator", "workers.window", "workers.exporter",
             "workers.celery_app", "psycopg", "celery", "structlog", "prometheus_client")
    code = ("import sys, workers.cli; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "", f"imported at CLI start: {done.stdout.strip()}"
