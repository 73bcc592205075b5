"""``statesweep exporter``: the Prometheus exporter, a long-running command (workers.exporter
holds the collector and the server; this is its place on the command line)."""

from workers.exporter import exporter_command

__all__ = ["exporter_command"]
