"""PostgreSQL heap tables: chunks are ranges of heap pages (ctid block ranges).

The split costs three catalog/sample probes, whatever the table's size (pgcopydb's same-table
concurrency does the same): the page count from ``pg_relation_size`` (exact and cheap), and a
page sample of a fixed number of pages (TABLESAMPLE SYSTEM) for rows per page and the fraction
expired, so a chunk spans the pages that hold about ``batch_size`` expired rows. Each chunk's
DELETE is then a Tid Range Scan over its pages (PostgreSQL >= 14), filtered by the expiry
predicate. The last range is open-ended: rows on pages appended after planning are covered.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from sqlalchemy import Connection, text

from workers.planners.base import BLOCKS, Plan, Unsupported
from workers.schema import Tables

#: Pages read by the density sample, whatever the table's size: planning stays O(1).
SAMPLE_PAGES = 256
#: A chunk never spans more pages than this (32 MiB at 8 KiB pages): where expired rows are
#: sparse, its scan still ends in tens of milliseconds and holds no long transaction.
MAX_PAGES_PER_CHUNK = 4096
MIN_SERVER_VERSION = 140000  # Tid Range Scan


@dataclass(frozen=True)
class Sample:
    """What a fixed-size page sample says about the table."""

    pages: int            # heap pages now (pg_relation_size / block_size)
    rows_per_page: float  # live rows per sampled page
    expired_fraction: float
    most_per_page: int = 0  # live rows on the fullest sampled page

    @property
    def expected_rows(self) -> int:
        return int(self.pages * self.rows_per_page * self.expired_fraction)


def _qualified(conn: Connection, tables: Tables) -> str:
    t = tables.task_state
    name = conn.dialect.identifier_preparer.format_table(t)
    return name


def check(conn: Connection, tables: Tables) -> None:
    if conn.dialect.name != "postgresql":
        raise Unsupported(f"needs PostgreSQL (this database is {conn.dialect.name})")
    version = int(conn.exec_driver_sql("SHOW server_version_num").scalar_one())
    if version < MIN_SERVER_VERSION:
        raise Unsupported(f"needs PostgreSQL 14 or newer for Tid Range Scans "
                          f"(server_version_num is {version})")
    am = conn.execute(text(
        "SELECT am.amname FROM pg_class c JOIN pg_am am ON am.oid = c.relam "
        "WHERE c.oid = CAST(:t AS regclass)"), {"t": _qualified(conn, tables)}).scalar_one()
    if am != "heap":
        raise Unsupported(f"needs a heap table ({tables.task_state.name} uses {am!r})")


def sample(conn: Connection, tables: Tables, cutoff: dt.datetime) -> Sample:
    name = _qualified(conn, tables)
    pages = int(conn.execute(text(
        "SELECT pg_relation_size(CAST(:t AS regclass)) / current_setting('block_size')::int"),
        {"t": name}).scalar_one())
    if pages == 0:
        return Sample(0, 0.0, 0.0)
    percent = min(100.0, 100.0 * SAMPLE_PAGES / pages)
    # REPEATABLE: the same pages for the same table, so a dry run and the run agree.
    row = conn.execute(text(
        f"SELECT coalesce(sum(n), 0), coalesce(sum(e), 0), count(*), coalesce(max(n), 0) "  # noqa: S608
        f"FROM (SELECT count(*) AS n, count(*) FILTER (WHERE expires_at < :cutoff) AS e "
        f"FROM {name} TABLESAMPLE SYSTEM (:pct) REPEATABLE (7) "
        f"GROUP BY (ctid::text::point)[0]) AS per_page"),
        {"cutoff": cutoff, "pct": percent}).one()
    rows, expired, seen, most = int(row[0]), int(row[1]), int(row[2]), int(row[3])
    if rows == 0:
        # Sampled pages empty (all dead, or an unlucky draw on a tiny table): use the
        # statistics, and if the table was never analysed, assume every row is expired so
        # chunks stay small rather than long.
        stats = conn.execute(text(
            "SELECT reltuples, relpages FROM pg_class WHERE oid = CAST(:t AS regclass)"),
            {"t": name}).one()
        per_page = float(stats[0]) / stats[1] if stats[1] > 0 and stats[0] > 0 else 1.0
        return Sample(pages, per_page, 1.0, math.ceil(per_page))
    return Sample(pages, rows / max(1, seen), expired / rows, most)


def most_pages(batch_size: int, most_per_page: int) -> int:
    """The most pages a chunk may span: twice the batch even if every row on them expired
    (expired rows cluster: a backlog's oldest pages are all expired, the newest all live)."""
    # A heap page holds at most what fits in 8 KiB, so the fullest of 256 sampled pages is
    # close to the most any page holds.
    return max(1, min(MAX_PAGES_PER_CHUNK, 2 * batch_size // max(1, most_per_page)))


def pages_for(batch_size: int, rows_per_page: float, expired_fraction: float) -> int:
    """Pages holding about *batch_size* expired rows, within [1, MAX_PAGES_PER_CHUNK]."""
    density = rows_per_page * expired_fraction
    if density <= 0:
        return MAX_PAGES_PER_CHUNK
    return max(1, min(MAX_PAGES_PER_CHUNK, math.ceil(batch_size / density)))


class BlocksPlanner:
    name = BLOCKS

    def check(self, conn: Connection, tables: Tables) -> None:
        check(conn, tables)

    def plan(self, conn: Connection, tables: Tables, cutoff: dt.datetime,
             batch_size: int, *, found: Sample | None = None) -> Plan:
        s = found or sample(conn, tables, cutoff)
        if s.pages == 0:
            return Plan(self.name, BLOCKS, 0, 0, 1, 0, "the table has no pages")
        if batch_size == 0:
            return Plan(self.name, BLOCKS, 0, s.pages, s.pages, s.expected_rows,
                        f"{s.pages} heap pages in one chunk (no batching)")
        most = most_pages(batch_size, s.most_per_page)
        size = min(most, pages_for(batch_size, s.rows_per_page, s.expired_fraction))
        return Plan(self.name, BLOCKS, 0, s.pages, size, s.expected_rows,
                    f"{s.pages} heap pages, about {s.rows_per_page:.0f} rows a page, "
                    f"{s.expired_fraction:.0%} expired in a {SAMPLE_PAGES}-page sample: "
                    f"{size} pages a chunk, at most {most}", max_size=most)
