"""What every planner produces, and the one interface they share.

A plan is arithmetic, not a list: a range kind, where the ranges start and end, and how many
units (heap pages or ids) the first chunk spans. Chunks are cut from it one at a time as the run's
in-flight window has room (see workers.window), so a plan costs the same whether the table has a
thousand rows or a billion, and the run store holds a cursor, never the ranges of a whole run.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # types only: workers.runs (so the CLI) imports this module, not SQLAlchemy
    from sqlalchemy import Connection

    from workers.schema import Tables

#: Range kinds a chunk message may carry.
BLOCKS = "blocks"  # PostgreSQL heap pages [lo, hi); hi None = open-ended (pages added later)
IDS = "ids"        # primary-key values [lo, hi)
WALK = "walk"      # ids [lo, hi) cut by walking the primary key, B expired rows at a time
EXPIRY = "expiry"  # (expires_at, id) keys [(lo, lo_id), (hi, hi_id)) of the expires_at index
DAGS = "dags"      # ids [lo, hi) of a run narrowed to dag ids: its DELETE reads the dag_id index
KINDS = (BLOCKS, IDS, WALK, EXPIRY, DAGS)
#: Kinds whose chunks are cut one at a time by a database probe, not by arithmetic in the run
#: store: the run store hands the window's room to the process that cuts them.
CUT_KINDS = (WALK, EXPIRY)


@dataclass(frozen=True)
class ChunkRange:
    """One chunk: units ``lo`` (inclusive) to ``hi`` (exclusive; None = to the end).

    An ``expiry`` range's bounds are keys: expires_at in microseconds since the epoch (lo, hi)
    and an id (lo_id, hi_id; 0 = from the first row of that timestamp)."""

    kind: str
    lo: int
    hi: int | None
    lo_id: int = 0
    hi_id: int = 0

    def encode(self) -> str:
        if self.kind == EXPIRY:
            hi = "" if self.hi is None else f"{self.hi}.{self.hi_id}"
            return f"{self.lo}.{self.lo_id}:{hi}"
        return f"{self.lo}:{'' if self.hi is None else self.hi}"

    @classmethod
    def decode(cls, kind: str, text: str) -> ChunkRange:
        lo, _, hi = text.partition(":")
        if kind == EXPIRY:
            lo_ts, _, lo_id = lo.partition(".")
            hi_ts, _, hi_id = hi.partition(".")
            return cls(kind, int(lo_ts), int(hi_ts) if hi_ts else None, int(lo_id or 0),
                       int(hi_id or 0))
        return cls(kind, int(lo), int(hi) if hi else None)


@dataclass(frozen=True)
class Plan:
    """Where a run's chunks come from.

    ``start``/``end``: the unit range to cover (end exclusive). For blocks the last chunk is
    open-ended, so rows on pages appended after planning are covered too. ``size``: units per
    chunk at first, chosen so a chunk holds about ``batch_size`` expired rows; the window may
    resize later chunks from what earlier ones measured. ``expected_rows``: an estimate.
    ``cursor``: where a cut kind's first chunk starts when that is not a plain unit (an expiry
    key); empty otherwise. ``max_size``: the most units a chunk may span, so that it holds at
    most twice ``batch_size`` rows even where every row in it has expired (0 = no such bound:
    a cut kind's chunks are bounded by their cut).
    """

    planner: str
    kind: str
    start: int
    end: int
    size: int
    expected_rows: int
    reason: str
    cursor: str = ""
    max_size: int = 0

    @property
    def empty(self) -> bool:
        return self.end <= self.start

    @property
    def estimated_chunks(self) -> int:
        if self.empty:
            return 0
        if self.kind == EXPIRY:
            return max(1, -(-self.expected_rows // max(1, self.size)))
        return max(1, -(-(self.end - self.start) // max(1, self.size)))


class Unsupported(Exception):
    """This planner cannot serve this database or table; the message says why."""


class Planner(Protocol):
    name: str

    def check(self, conn: Connection, tables: Tables) -> None:
        """Raise Unsupported (with the reason) when this database cannot use the planner."""

    def plan(self, conn: Connection, tables: Tables, cutoff: dt.datetime,
             batch_size: int) -> Plan:
        """A plan for the rows expired at *cutoff*, from probes only (no row walk)."""
