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

from sqlalchemy import Connection, and_, bindparam, func, or_, select, text

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


def estimate_expired(conn: Connection, tables: Tables, cutoff: dt.datetime,
                     first: Key) -> int | None:
    """The server's own estimate of the expired rows from *first* (the first expired key) to
    the cutoff, from its statistics (EXPLAIN: nothing is read but the catalog and at most the
    index's ends); None where there is none (SQLite).

    Counting the expired rows reads each one's index entry and, on a PostgreSQL table whose
    visibility map the writers and the last run cleared (no VACUUM since), its heap tuple too:
    in the steady state that doubled the rows a run reads, and took most of its plan. The
    estimate is of the interval from the first expired key, not of everything before the
    cutoff: statistics older than the last runs still hold the rows those runs deleted, below
    that key."""
    t = tables.task_state
    if conn.dialect.name not in ("postgresql", "mysql", "mariadb"):
        return None
    quote = conn.dialect.identifier_preparer
    # Core has no EXPLAIN; the names are the schema's, quoted by the dialect, and the cutoff
    # is bound with the column's type (UTC on every backend).
    column = quote.quote(t.c.expires_at.name)
    table = quote.format_table(t)
    explain = "EXPLAIN (FORMAT JSON)" if conn.dialect.name == "postgresql" else "EXPLAIN"
    statement = text(f"{explain} SELECT 1 FROM {table} "  # noqa: S608
                     f"WHERE {column} >= :first AND {column} < :cutoff").bindparams(
        bindparam("first", from_micros(first[0]), type_=t.c.expires_at.type),
        bindparam("cutoff", cutoff, type_=t.c.expires_at.type))
    try:
        if conn.dialect.name == "postgresql":
            found = conn.execute(statement).scalar()
            return int(found[0]["Plan"]["Plan Rows"])  # type: ignore[index]
        # A range on the index: InnoDB dives into it for the estimate. A full scan's rows are
        # the table's, which errs high as above.
        rows = conn.execute(statement).mappings().all()
        return sum(int(r["rows"] or 0) for r in rows)
    except (KeyError, IndexError, TypeError, ValueError):
        return None


#: The most live expired rows (kept for unfinished dag runs, refreshed) mark_deleted walks past
#: before it stops: it is a tidy-up, bounded whatever the table holds.
MARK_LIVE_CAP = 10_000


def mark_deleted(conn: Connection, tables: Tables, cutoff: dt.datetime) -> None:
    """Walk the expires_at index up to *cutoff* once, after a run's last DELETE committed, so
    PostgreSQL marks the entries of the rows the run deleted dead in the index (an index scan
    that finds a heap tuple dead to every transaction flags its entry; VACUUM removes it later).
    The next run's first probe then steps over flagged entries on each leaf page instead of
    visiting every one's heap tuple: without this, the next plan paid that visit for every row
    this run deleted (about 0.7-1.5 us each: 390 ms after a 525k-row run, 20-40 ms in the
    steady state), on the next run's critical path. Done by the worker that finished the run,
    after the run store says so: off the path of `cleanup --wait` too."""
    t = tables.task_state
    # In index order: stale statistics (the deleted rows still in them) make a bare count a
    # sequential scan, which flags nothing in the index.
    walked = (select(t.c.expires_at).where(t.c.expires_at < cutoff)
              .order_by(t.c.expires_at).limit(MARK_LIVE_CAP))
    conn.execute(select(func.count()).select_from(walked.subquery())).scalar()


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
             batch_size: int, *, counted: int | None = None,
             estimated: int | None = None, first: Key | None = None) -> Plan:
        """*counted*: the expired rows, where the caller counted them already; *estimated*:
        the server's estimate of them, taken for the plan's estimate instead of a count;
        *first*: the first expired key, where the caller probed it already."""
        if counted == 0:
            return Plan(self.name, EXPIRY, 0, 0, max(1, batch_size), 0, "no expired rows")
        first = first or first_key(conn, tables, cutoff)
        if first is None:
            return Plan(self.name, EXPIRY, 0, 0, max(1, batch_size), 0, "no expired rows")
        if counted is None and estimated is not None:
            n, about = max(1, estimated), f"about {max(1, estimated)} (estimated)"
        else:
            n = count_expired(conn, tables, cutoff) if counted is None else counted
            about = f"at least {n}" if n >= COUNT_CAP else f"{n}"
        return Plan(self.name, EXPIRY, 0, 1, max(1, batch_size), n,
                    f"{about} expired rows from {from_micros(first[0]).isoformat()} on the "
                    f"expires_at index, cut every {batch_size or 'all'} rows",
                    cursor=encode_key(first))
