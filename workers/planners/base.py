"""What every planner produces, and the one interface they share.

A plan is arithmetic, not a list: a range kind, where the ranges start and end, and how many
units (heap pages or ids) the first chunk spans. Chunks are cut from it one at a time as the run's
in-flight window has room (see workers.window), so a plan costs the same whether the table has a
thousand rows or a billion, and the run store holds a cursor, never the ranges of a whole run.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Connection

from workers.schema import Tables

#: Range kinds a chunk message may carry.
BLOCKS = "blocks"  # PostgreSQL heap pages [lo, hi); hi None = open-ended (pages added later)
IDS = "ids"        # primary-key values [lo, hi)
WALK = "walk"      # ids [lo, hi) cut by walking the primary key, B expired rows at a time
KINDS = (BLOCKS, IDS, WALK)


@dataclass(frozen=True)
class ChunkRange:
    """One chunk: units ``lo`` (inclusive) to ``hi`` (exclusive; None = to the end)."""

    kind: str
    lo: int
    hi: int | None

    def encode(self) -> str:
        return f"{self.lo}:{'' if self.hi is None else self.hi}"

    @classmethod
    def decode(cls, kind: str, text: str) -> ChunkRange:
        lo, _, hi = text.partition(":")
        return cls(kind, int(lo), int(hi) if hi else None)


@dataclass(frozen=True)
class Plan:
    """Where a run's chunks come from.

    ``start``/``end``: the unit range to cover (end exclusive). For blocks the last chunk is
    open-ended, so rows on pages appended after planning are covered too. ``size``: units per
    chunk at first, chosen so a chunk holds about ``batch_size`` expired rows; the window may
    resize later chunks from what earlier ones measured. ``expected_rows``: an estimate.
    """

    planner: str
    kind: str
    start: int
    end: int
    size: int
    expected_rows: int
    reason: str

    @property
    def empty(self) -> bool:
        return self.end <= self.start

    @property
    def estimated_chunks(self) -> int:
        if self.empty:
            return 0
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
