"""What an operator narrows a run to, spelled as ``airflow db clean`` spells it.

``--dag-ids`` and ``--exclude-dag-ids`` (comma-separated) keep the run to some dag ids or away
from some; ``--clean-before-timestamp`` moves the run's cutoff back to that instant (a grace
period: state that expired after it stays for a later run). A periodic run (beat) has no fixed
instant to give: its grace is a duration, ``clean_grace_seconds``, taken from the database's
now() when the run fixes its cutoff. A selection only narrows what a DELETE may touch: the
cutoff is never later than the database's now(), and every DELETE still re-checks
``expires_at < cutoff``.

A run's selection travels in its run record, so every chunk's DELETE applies the same one.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workers.exceptions import InvalidArgument

if TYPE_CHECKING:  # the CLI checks a selection before sending it, with no database import
    from workers.schema import Tables

#: Dag ids one selection may name: a DELETE's IN list stays a short statement.
MAX_DAG_IDS = 1000
#: The longest grace: ten years keeps now() - grace a date every database can hold.
MAX_GRACE_SECONDS = 10 * 366 * 24 * 3600


@dataclass(frozen=True)
class Selection:
    dag_ids: tuple[str, ...] = ()
    exclude_dag_ids: tuple[str, ...] = ()
    before: dt.datetime | None = None  # --clean-before-timestamp, aware UTC
    grace: dt.timedelta | None = None  # clean_grace_seconds: the cutoff is now - grace

    @property
    def empty(self) -> bool:
        return not (self.dag_ids or self.exclude_dag_ids or self.before or self.grace)

    def cutoff(self, now: dt.datetime) -> dt.datetime:
        """The run's cutoff: the database's now, or now - grace, or the given timestamp,
        whichever is earliest: a selection never moves the cutoff past now."""
        return min((now, *((now - self.grace,) if self.grace else ()),
                    *((self.before,) if self.before is not None else ())))

    def conditions(self, tables: Tables) -> list[Any]:
        """The dag-id filters, for a DELETE or a count (the cutoff is the caller's)."""
        t = tables.task_state
        cond: list[Any] = []
        if self.dag_ids:
            cond.append(t.c.dag_id.in_(self.dag_ids))
        if self.exclude_dag_ids:
            cond.append(t.c.dag_id.not_in(self.exclude_dag_ids))
        return cond

    def describe(self) -> str:
        parts = []
        if self.dag_ids:
            parts.append(f"dag ids {', '.join(self.dag_ids)}")
        if self.exclude_dag_ids:
            parts.append(f"excluding dag ids {', '.join(self.exclude_dag_ids)}")
        if self.before is not None:
            parts.append(f"expired before {self.before.isoformat()}")
        if self.grace:
            parts.append(f"expired more than {_duration(self.grace)} ago")
        return "; ".join(parts) or "everything expired"

    def encode(self) -> str:
        """As the run record keeps it ("" for no selection)."""
        if self.empty:
            return ""
        return json.dumps({"dag_ids": list(self.dag_ids),
                           "exclude_dag_ids": list(self.exclude_dag_ids),
                           "before": self.before.isoformat() if self.before else None,
                           "grace_seconds": self.grace.total_seconds() if self.grace else None})

    @classmethod
    def decode(cls, text: str) -> Selection:
        if not text:
            return cls()
        d = json.loads(text)
        before, grace = d.get("before"), d.get("grace_seconds")
        return cls(tuple(d.get("dag_ids") or ()), tuple(d.get("exclude_dag_ids") or ()),
                   dt.datetime.fromisoformat(before) if before else None,
                   dt.timedelta(seconds=grace) if grace else None)

    @classmethod
    def from_args(cls, dag_ids: Any = None, exclude_dag_ids: Any = None,
                  clean_before_timestamp: Any = None,
                  clean_grace_seconds: Any = None) -> Selection:
        """Check a task's or the CLI's arguments; InvalidArgument names the bad one."""
        return cls(_dag_ids("dag_ids", dag_ids), _dag_ids("exclude_dag_ids", exclude_dag_ids),
                   _timestamp(clean_before_timestamp), _grace(clean_grace_seconds))


def _dag_ids(name: str, value: Any) -> tuple[str, ...]:
    """Dag ids from a comma-separated string (Airflow's spelling) or a list of strings."""
    try:
        return parse_dag_ids(value)
    except ValueError as exc:
        raise InvalidArgument(f"{name} {exc}") from None


def parse_dag_ids(value: Any) -> tuple[str, ...]:
    """Dag ids from a comma-separated string or a list of strings, each once; ValueError says
    what is wrong, for the caller to name the argument or setting."""
    if value is None or value == "":
        return ()
    items: Iterable[Any]
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise ValueError(f"must be comma-separated dag ids or a list of them, got {value!r}")
    from workers.schema import ID_LEN  # here: an empty selection imports no SQLAlchemy

    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"must name dag ids (non-empty strings), got {value!r}")
        dag_id = item.strip()
        if len(dag_id) > ID_LEN:
            raise ValueError(f"must name dag ids of at most {ID_LEN} characters, got "
                             f"{dag_id[:40]!r}… ({len(dag_id)})")
        if dag_id not in out:
            out.append(dag_id)
    if len(out) > MAX_DAG_IDS:
        raise ValueError(f"names {len(out)} dag ids; at most {MAX_DAG_IDS}")
    return tuple(out)


def _grace(value: Any) -> dt.timedelta | None:
    """clean_grace_seconds: a number of seconds, 0 or None for none."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 <= value <= MAX_GRACE_SECONDS:
        raise InvalidArgument(f"clean_grace_seconds must be a number of seconds from 0 to "
                              f"{MAX_GRACE_SECONDS} (ten years), got {value!r}")
    return dt.timedelta(seconds=value) if value else None


#: Units a grace period may be written in (STATESWEEP_CLEAN_GRACE=6h).
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(raw: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``6h``, ``2d`` or ``1w``; ValueError says what
    is wrong (the caller names the setting)."""
    text = raw.strip().lower()
    number, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "s")
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except ValueError:
        raise ValueError("must be a duration: seconds, or a number with s, m, h, d or w "
                         "(e.g. 6h, 2d)") from None
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_GRACE_SECONDS:
        raise ValueError(f"must be a duration from 0 to ten years ({MAX_GRACE_SECONDS} s)")
    return seconds


def _duration(d: dt.timedelta) -> str:
    """A grace as people write it: 6h, 2d, 90s."""
    seconds = d.total_seconds()
    for unit in ("w", "d", "h", "m"):
        if seconds >= DURATION_UNITS[unit] and seconds % DURATION_UNITS[unit] == 0:
            return f"{seconds / DURATION_UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def _timestamp(value: Any) -> dt.datetime | None:
    """--clean-before-timestamp: ISO-8601, a naive value taken as UTC (Airflow's default
    timezone)."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(f"clean_before_timestamp is not an ISO-8601 timestamp: "
                                  f"{value!r} (e.g. 2026-12-01T00:00:00+00:00)") from None
    else:
        raise InvalidArgument(f"clean_before_timestamp must be an ISO-8601 string, got "
                              f"{value!r}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC)
