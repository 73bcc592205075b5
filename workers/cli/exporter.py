"""``statesweep exporter``: the Prometheus exporter, a long-running command; the collector and
the HTTP server are in workers.exporter."""

from __future__ import annotations

import click

from workers.metrics import EXPORTER_PORT as DEFAULT_PORT


@click.command("exporter")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default: /metrics has no authentication; "
                   "in a container, --host=0.0.0.0 and a network only Prometheus reaches).")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port of /metrics.")
def exporter_command(host: str, port: int) -> None:
    """Serve Prometheus metrics: counters, backlog, last run, workers (long-running)."""
    from workers.exporter import serve
    from workers.logs import configure_logging
    from workers.settings import Settings

    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level, force=True)
    serve(settings, host, port)
