"""Driving the CLI in-process (click's CliRunner) as the tests do: ``invoke`` with the test's
environment as the whole configuration, ``restore_logging`` (an autouse fixture where
imported) to put the process's logging back, and ``closed_port`` for a service that is down."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from click.testing import CliRunner, Result

from workers.cli import cli


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def invoke(*args: str, env: dict[str, str], unset: tuple[str, ...] = ("STATESWEEP_",)) -> Result:
    """Run ``statesweep *args`` with *env*; the variables of this process named by *unset*
    (prefixes: the developer's shell's STATESWEEP_*, or AIRFLOW* too) are unset first."""
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith(unset)}
    clean.update(env)
    return CliRunner().invoke(cli, list(args), env=clean, catch_exceptions=False)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The CLI routes logging to its own stderr; put the process's logging back afterwards."""
    import logging

    import structlog

    from workers import logs

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config, configured = structlog.get_config(), logs._configured
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**config)
        logs._configured = configured
