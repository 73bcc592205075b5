"""The steady state: chunks are keyset intervals of the expires_at index.

After the first backlog, each run finds a small share of the table expired: rows expire
continuously, so what expired since the last run sits at the start of the ``expires_at`` index
(Airflow creates that index on every backend; so does ``statesweep db upgrade``). Scanning
every heap page to find it costs the table; walking the index costs the expired rows.

A chunk is an interval of that index in ``(expires_at, id)`` order, from ``lo`` (inclusive) to
``hi`` (exclusive; None = up to the cutoff). Keys are whole numbers: expires_at in microseconds
since the epoch, and an id, where id 0 means "from the first row of that timestamp". Chunks
are cut as the window has room, each by one probe that reads at most ``size + 1`` entries of
the index (no heap row is read where the visibility map allows an index-only scan), and a
second probe, by id, only where more than ``size`` rows share one timestamp (a bulk write): so
every chunk holds at most ``size`` rows that were expired when it was cut.

Each DELETE is an index range scan bounded by its interval and re-checks
``expires_at < cutoff`` like every other chunk, so a row refreshed after the cut moves out of
the interval and survives.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, and_, func, or_, select, text

from workers.planners.base import EXPIRY, ChunkRange, Plan
from workers.schema import Tables

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: Expired rows counted, at most, for the plan's estimate (progress and --dry-run): an index
#: count, bounded so that a forced expiry plan of a huge backlog still plans in milliseconds.
COUNT_CAP = 1_000_000

Key = tuple[int, int]


def to_micros(when: dt.datetime) -> int:
    return (when.astimezone(dt.UTC) - EPOCH) // dt.timedelta(microseconds=1)


def from_micros(micros: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=micros)


def encode_key(key: Key) -> str:
    return f"{key[0]}.{key[1]}"


def decode_key(text: str) -> Key:
    ts, _, ident = text.partition(".")
    return int(ts), int(ident or 0)


def describe_key(micros: int, ident: int) -> str:
    """A key as an operator reads it: the timestamp, and the id where one splits it."""
    when = from_micros(micros).isoformat()
    return when if ident == 0 else f"{when} id {ident}"


def at_or_after(tables: Tables, key: Key) -> list[object]:
    """Rows at or after *key* in (expires_at, id) order, as conditions an index range scan
    uses: the bare bound on expires_at is what the server's range scan starts from."""
    t = tables.task_state
    ts, ident = from_micros(key[0]), key[1]
    if ident == 0:
        return [t.c.expires_at >= ts]
    return [t.c.expires_at >= ts, or_(t.c.expires_at > ts, and_(t.c.expires_at == ts,
                                                                  t.c.id >= ident))]


def before(tables: Tables, key: Key) -> list[object]:
    """Rows before *key* in (expires_at, id) order (the exclusive upper bound)."""
    t = tables.task_state
    ts, ident = from_micros(key[0]), key[1]
    if ident == 0:
        return [t.c.expires_at < ts]
    return [t.c.expires_at <= ts, or_(t.c.expires_at < ts, and_(t.c.expires_at == ts,
                                                                  t.c.id < ident))]


def chunk_range(lo: Key, hi: Key | None) -> ChunkRange:
    return ChunkRange(EXPIRY, lo[0], None if hi is None else hi[0], lo[1],
                      0 if hi is None else hi[1])


def cut(conn: Connection, tables: Tables, cutoff: dt.datetime, lo: Key, size: int) -> Key | None:
    """The end of the chunk that starts at *lo* (the next chunk's start), or None when the rows
    from *lo* to the cutoff fit in one chunk of *size* rows."""
    if size <= 0:
        return None
    t = tables.task_state
    lo_ts = from_micros(lo[0])
    expired = t.c.expires_at < cutoff
    # The timestamp of the row size places on from lo's timestamp: only expires_at is read, so
    # the server answers from the index alone.
    boundary = conn.execute(
        select(t.c.expires_at).where(t.c.expires_at >= lo_ts, expired)
        .order_by(t.c.expires_at).offset(size).limit(1)).scalar()
    if boundary is None:
        return None
    if boundary > lo_ts:
        # Every row before that timestamp fits: at most size rows lie between lo and it.
        return to_micros(boundary), 0
    # More than size rows share lo's timestamp: split them by id.
    ident = conn.execute(
        select(t.c.id).where(t.c.expires_at == lo_ts, t.c.id >= max(lo[1], 0))
        .order_by(t.c.id).offset(size).limit(1)).scalar()
    if ident is not None:
        return lo[0], int(ident)
    after = conn.execute(select(func.min(t.c.expires_at)).where(t.c.expires_at > lo_ts,
                                                                 expired)).scalar()
    return None if after is None else (to_micros(after), 0)


def first_key(conn: Connection, tables: Tables, cutoff: dt.datetime) -> Key | None:
    """Where the expired rows start in the index; None when nothing has expired."""
    t = tables.task_state
    first = conn.execute(select(func.min(t.c.expires_at)).where(t.c.expires_at < cutoff)).scalar()
    return None if first is None else (to_micros(first), 0)


def count_expired(conn: Connection, tables: Tables, cutoff: dt.datetime,
                  cap: int = COUNT_CAP) -> int:
    """Expired rows, counted on the index up to *cap* (a bounded read)."""
    t = tables.task_state
    expired = select(t.c.id).where(t.c.expires_at < cutoff).limit(cap).subquery()
    return int(conn.execute(select(func.count()).select_from(expired)).scalar_one())


def table_rows(conn: Connection, tables: Tables) -> int:
    """About how many rows the table holds, from the catalog where there is one: reltuples on
    PostgreSQL, InnoDB's estimate on MySQL/MariaDB; else the id span (two index probes)."""
    t = tables.task_state
    found: object = None
    if conn.dialect.name in ("mysql", "mariadb"):
        found = conn.execute(text(
            "SELECT table_rows FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = :t"), {"t": t.name}).scalar()
    elif conn.dialect.name == "postgresql":
        # reltuples: -1 before the first VACUUM or ANALYZE (then the id span answers).
        found = conn.execute(text(
            "SELECT reltuples FROM pg_class WHERE oid = CAST(:t AS regclass)"),
            {"t": conn.dialect.identifier_preparer.format_table(t)}).scalar()
    if found is not None and float(found) > 0:  # type: ignore[arg-type]
        return int(float(found))  # type: ignore[arg-type]
    lo, hi = conn.execute(select(func.min(t.c.id), func.max(t.c.id))).one()
    return 0 if lo is None else int(hi) - int(lo) + 1


class ExpiryPlanner:
    name = EXPIRY

    def check(self, conn: Connection, tables: Tables) -> None:
        """Every database statesweep serves has the expires_at index (Airflow creates it)."""

    def plan(self, conn: Connection, tables: Tables, cutoff: dt.datetime,
             batch_size: int, *, counted: int | None = None) -> Plan:
        """*counted*: the expired rows, where the caller counted them already."""
        if counted == 0:
            return Plan(self.name, EXPIRY, 0, 0, max(1, batch_size), 0, "no expired rows")
        first = first_key(conn, tables, cutoff)
        if first is None:
            return Plan(self.name, EXPIRY, 0, 0, max(1, batch_size), 0, "no expired rows")
        n = count_expired(conn, tables, cutoff) if counted is None else counted
        about = f"at least {n}" if n >= COUNT_CAP else f"{n}"
        return Plan(self.name, EXPIRY, 0, 1, max(1, batch_size), n,
                    f"{about} expired rows from {from_micros(first[0]).isoformat()} on the "
                    f"expires_at index, cut every {batch_size or 'all'} rows",
                    cursor=encode_key(first))
