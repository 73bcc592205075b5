"""What an operator narrows a run to, spelled as ``airflow db clean`` spells it.

``--dag-ids`` and ``--exclude-dag-ids`` (comma-separated) keep the run to some dag ids or away
from some; ``--clean-before-timestamp`` moves the run's cutoff back to that instant (a grace
period: state that expired after it stays for a later run). A selection only narrows what a
DELETE may touch: the cutoff is never later than the database's now(), and every DELETE still
re-checks ``expires_at < cutoff``.

A run's selection travels in its run record, so every chunk's DELETE applies the same one.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workers.exceptions import InvalidArgument

if TYPE_CHECKING:  # the CLI checks a selection before sending it, with no database import
    from workers.schema import Tables

#: Dag ids one selection may name: a DELETE's IN list stays a short statement.
MAX_DAG_IDS = 1000


@dataclass(frozen=True)
class Selection:
    dag_ids: tuple[str, ...] = ()
    exclude_dag_ids: tuple[str, ...] = ()
    before: dt.datetime | None = None  # --clean-before-timestamp, aware UTC

    @property
    def empty(self) -> bool:
        return not (self.dag_ids or self.exclude_dag_ids or self.before)

    def cutoff(self, now: dt.datetime) -> dt.datetime:
        """The run's cutoff: the database's now, or the given timestamp if that is earlier."""
        return now if self.before is None or self.before >= now else self.before

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
        return "; ".join(parts) or "everything expired"

    def encode(self) -> str:
        """As the run record keeps it ("" for no selection)."""
        if self.empty:
            return ""
        return json.dumps({"dag_ids": list(self.dag_ids),
                           "exclude_dag_ids": list(self.exclude_dag_ids),
                           "before": self.before.isoformat() if self.before else None})

    @classmethod
    def decode(cls, text: str) -> Selection:
        if not text:
            return cls()
        d = json.loads(text)
        before = d.get("before")
        return cls(tuple(d.get("dag_ids") or ()), tuple(d.get("exclude_dag_ids") or ()),
                   dt.datetime.fromisoformat(before) if before else None)

    @classmethod
    def from_args(cls, dag_ids: Any = None, exclude_dag_ids: Any = None,
                  clean_before_timestamp: Any = None) -> Selection:
        """Check a task's or the CLI's arguments; InvalidArgument names the bad one."""
        return cls(_dag_ids("dag_ids", dag_ids), _dag_ids("exclude_dag_ids", exclude_dag_ids),
                   _timestamp(clean_before_timestamp))


def _dag_ids(name: str, value: Any) -> tuple[str, ...]:
    """Dag ids from a comma-separated string (Airflow's spelling) or a list of strings."""
    if value is None or value == "":
        return ()
    items: Iterable[Any]
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise InvalidArgument(f"{name} must be comma-separated dag ids or a list of them, "
                              f"got {value!r}")
    from workers.schema import ID_LEN

    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise InvalidArgument(f"{name} must name dag ids (non-empty strings), got {value!r}")
        dag_id = item.strip()
        if len(dag_id) > ID_LEN:
            raise InvalidArgument(f"{name}: a dag id is at most {ID_LEN} characters, got "
                                  f"{dag_id[:40]!r}… ({len(dag_id)})")
        if dag_id not in out:
            out.append(dag_id)
    if len(out) > MAX_DAG_IDS:
        raise InvalidArgument(f"{name} names {len(out)} dag ids; at most {MAX_DAG_IDS}")
    return tuple(out)


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
