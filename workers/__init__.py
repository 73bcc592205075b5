"""statesweep: garbage-collects Airflow's task and asset state tables with Celery workers.

``celery -A workers worker|beat|flower`` finds the Celery app as ``workers.app``; it is built on
first access so importing ``workers.settings`` or ``workers.store`` needs no broker settings.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from workers.celery_app import app

        return app
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
