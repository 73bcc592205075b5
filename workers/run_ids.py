"""A run's id: one format for every trigger (beat, the CLI, Flower, `celery call`).

Its own module so the CLI can name a run before sending its coordinator without importing the
coordinator (and with it SQLAlchemy and the planners).
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Any

from workers.exceptions import InvalidArgument

# A run id becomes part of Redis keys and log lines: short and plain, and no ':' so that it can
# never address another run's keys.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]


def check_run_id(run_id: Any) -> str:
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise InvalidArgument(
            f"run_id must be 1-64 letters, digits, '.', '_' or '-', got {run_id!r}")
    return run_id
