"""A ``db-clean`` run in this process: Airflow's tables in Airflow's order, each cut into keyset
chunks of at most ``batch_size`` eligible rows, each chunk archived and deleted in one
transaction of its own (:func:`workers.dbclean.statements.move_chunk`).

The archive table of a table is made once per run, before its first chunk, and named as Airflow
names it, ``_airflow_deleted__<table>__<YYYYmmddHHMMSS>``, the time being the database's clock
at the start of the run. ``skip_archive`` makes none.

Chunk size follows time (:func:`next_size`): every transaction that deletes from a table (a
chunk of it, a batch of it under a parent's chunk) is timed, and the table's next one is sized
from its recent ones so it takes about half of ``target_ms`` (workers.flow.sizing's policy, the
cleanup's own): a table whose rows fire PostgreSQL's per-row cascade triggers (task_instance,
dag_run) gets small chunks, a light one (log) keeps ``batch_size``, which no chunk exceeds.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import structlog
from sqlalchemy import Connection, Engine, Table, inspect
from sqlalchemy.exc import DBAPIError, OperationalError

from workers.db import db_now, set_timeouts
from workers.dbclean import cascade
from workers.dbclean import statements as sql
from workers.dbclean.rules import ARCHIVE_PREFIX, TableRule, airflow_version, effective_tables
from workers.flow.sizing import ChunkTiming, SizingPolicy

log = structlog.get_logger("statesweep.dbclean")

#: Called inside each chunk's transaction after its move, before commit: (table, rows).
ChunkHook = Callable[[str, int], None]
#: The longest a db-clean transaction (a chunk, a batch of dependants) should take (issue 24).
TARGET_TRANSACTION_MS = 200


@dataclass(frozen=True)
class Request:
    before: dt.datetime
    tables: tuple[str, ...] = ()
    dag_ids: tuple[str, ...] = ()
    exclude_dag_ids: tuple[str, ...] = ()
    batch_size: int = 10000
    skip_archive: bool = False
    dry_run: bool = False
    protect_unfinished: bool = True  # STATESWEEP_PROTECT_UNFINISHED_DAG_RUNS
    lock_timeout_ms: int = 5000  # STATESWEEP_LOCK_TIMEOUT_MS, per chunk transaction
    statement_timeout_ms: int = 20000  # STATESWEEP_STATEMENT_TIMEOUT_MS
    target_ms: int = TARGET_TRANSACTION_MS  # chunks are sized to take about half of it


@dataclass
class TableResult:
    table: str
    eligible: int = 0  # rows eligible when the table was planned (the dry run's count)
    deleted: int = 0
    chunks: int = 0
    archive: str | None = None
    skipped: str = ""  # why the table was not cleaned, if it was not
    failed: str = ""  # the database's error, if a chunk failed (earlier chunks stay done)
    dependants: int = 0  # rows of dependant tables deleted before their parent chunks
    longest_transaction_ms: float = 0.0  # the table's longest chunk or dependant batch

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Report:
    version: str
    before: dt.datetime
    dry_run: bool
    tables: list[TableResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"airflow": self.version, "clean_before_timestamp": self.before.isoformat(),
                "dry_run": self.dry_run, "tables": [t.as_dict() for t in self.tables]}


# --- chunk size from time ------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """One transaction that deleted from a table: the rows it was sized for, the rows it
    deleted, how long it was open, and whether it gave up on a lock."""

    planned: int
    rows: int
    seconds: float
    lock_timeout: bool = False


#: Transactions of a table its next size is judged by (the policy's own window).
SIZING_WINDOW = 5
#: A table's (or a parent's dependant's) first transaction, before any is timed, moves
#: batch_size // FIRST_SIZE_DIVISOR rows.
FIRST_SIZE_DIVISOR = 20


def is_evidence(timing: Timing) -> bool:
    """Whether a transaction says how long the table's rows take: one that found at least half
    the rows it was sized for (or gave up on a lock). One that found fewer (a table's last
    chunk, a dependant batch that finds a few rows left) took the time of its search, not of
    its rows: a smaller size would not make it shorter, only make more of them."""
    return timing.lock_timeout or (timing.rows > 0 and timing.rows * 2 >= timing.planned)


def sizing_policy(batch_size: int, target_ms: int) -> SizingPolicy:
    """Aims at half of *target_ms*, so the noise of a shared machine leaves room, and halves
    at once after a transaction over *target_ms*; never above *batch_size* (the operator's
    bound), never below a hundredth of it (per-chunk overhead would dominate)."""
    return SizingPolicy(target_ms / 2000, minimum=max(1, batch_size // 100),
                        maximum=batch_size, window=SIZING_WINDOW)


def next_size(batch_size: int, target_ms: int, recent: Sequence[Timing]) -> int:
    """The rows of a table's next transaction, from its recent ones (oldest first); with
    ``batch_size`` 0 (one chunk per table) always 0.

    While none is known, a FIRST_SIZE_DIVISOR-th of the batch size: a table whose rows fire
    per-row cascade triggers took 820 ms for a first chunk of 10,000 task instances on the
    loaded bench machine, and at a tenth the first transaction was still the longest of a run
    twice (1,000 task instances on MariaDB with Airflow 3.4, 255 ms; the first 1,000
    reschedules under a dag_run chunk at the issue's size, 221 ms); a light table's chunks grow
    back to the batch size within about seventeen. Throughput counts the rows each one deleted,
    growth is from the size the last one was cut at."""
    if batch_size <= 0:
        return batch_size
    if not recent:
        return max(1, batch_size // FIRST_SIZE_DIVISOR)
    timings = [ChunkTiming(t.planned if t.lock_timeout else max(1, t.rows), t.seconds,
                           t.lock_timeout) for t in recent[-SIZING_WINDOW:]]
    return sizing_policy(batch_size, target_ms).next_size(recent[-1].planned, timings)


class Sizer(Protocol):
    """Where a run keeps its tables' timings: this process (--local), or the run store (the
    workers, workers.dbclean.distributed)."""

    def size(self, table: str) -> int: ...

    def note(self, table: str, timing: Timing, evidence: bool | None = None) -> None: ...


@dataclass
class Sizes:
    """Timings kept in this process: a --local run's."""

    batch_size: int
    target_ms: int
    recent: dict[str, list[Timing]] = field(default_factory=dict)
    longest_ms: dict[str, float] = field(default_factory=dict)

    def size(self, table: str) -> int:
        return next_size(self.batch_size, self.target_ms, self.recent.get(table, []))

    def note(self, table: str, timing: Timing, evidence: bool | None = None) -> None:
        """*evidence*: whether it sizes the table's next transactions (is_evidence when None);
        its time counts towards the table's longest either way."""
        ms = round(timing.seconds * 1000, 1)
        self.longest_ms[table] = max(ms, self.longest_ms.get(table, 0.0))
        if is_evidence(timing) if evidence is None else evidence:
            recent = self.recent.setdefault(table, [])
            recent.append(timing)
            del recent[:-SIZING_WINDOW]


def run_tag(now: dt.datetime) -> str:
    """Airflow's archive suffix: the time as 14 digits."""
    return now.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S")


def plan(engine: Engine, request: Request) -> tuple[str, list[TableRule]]:
    """The Airflow version and the rules to run, dependants first; bad --tables raises before
    anything is read but the schema."""
    version = airflow_version(engine)
    return version, effective_tables(version, request.tables)


def clean(engine: Engine, request: Request, *, on_chunk: ChunkHook | None = None,
          on_progress: Callable[[TableResult], None] | None = None,
          sizes: Sizes | None = None) -> Report:
    """Run *request* (count only, with ``dry_run``); returns what each table did. *sizes*
    keeps the tables' timings (a test gives its own, to decide sizes from times it chose)."""
    version, rules = plan(engine, request)
    report = Report(version, request.before, request.dry_run)
    live = set(inspect(engine).get_table_names())
    filtered = bool(request.dag_ids or request.exclude_dag_ids)
    with engine.connect() as conn:
        tag = run_tag(db_now(conn))
        fks = cascade.ForeignKeys(conn)
    sizes = sizes or Sizes(request.batch_size, request.target_ms)
    for rule in rules:
        result = TableResult(rule.table)
        report.tables.append(result)
        if rule.table not in live:
            result.skipped = "not in this database"
            continue
        with engine.connect() as conn:
            t = sql.reflect(conn, rule.table)
            missing = sql.missing_columns(rule, t, filtered)
            if missing:
                # Airflow's statement fails on this table and its run skips it: say so here.
                result.skipped = f"its rule needs {', '.join(missing)}, which {rule.table} lacks"
                log.warning("db_clean_table_skipped", table=rule.table, reason=result.skipped)
                continue
            if not sql.key_columns(t):
                result.skipped = "it has no primary key to cut chunks by"
                continue
            cond = sql.eligible(conn, rule, t, request.before, request.dag_ids,
                                request.exclude_dag_ids, request.protect_unfinished)
            result.eligible = sql.count(conn, t, cond)
        if request.dry_run or result.eligible == 0:
            continue
        try:
            _clean_table(engine, version, rule, request, result, tag, live, fks, sizes,
                         on_chunk, on_progress)
        except DBAPIError as exc:
            # As Airflow: a table whose statement fails (a RESTRICT foreign key its cascade
            # meets, a lock timeout) is reported and the next table runs. The failed chunk
            # rolled back whole; the chunks before it stay deleted and archived.
            if exc.connection_invalidated:
                raise
            result.failed = " ".join(str(exc.orig or exc).split())[:500]
            log.warning("db_clean_table_failed", table=rule.table, error=result.failed)
    for result in report.tables:
        result.longest_transaction_ms = sizes.longest_ms.get(result.table, 0.0)
    return report


def _archive_name(tag: str, table: str, live: set[str]) -> str:
    """Airflow's name for this run's archive of *table*; a name taken by another run in the same
    second moves to the next second, so two runs never share one archive."""
    when = dt.datetime.strptime(tag, "%Y%m%d%H%M%S")
    while True:
        name = f"{ARCHIVE_PREFIX}{table}__{when.strftime('%Y%m%d%H%M%S')}"
        if name not in live:
            return name
        when += dt.timedelta(seconds=1)


def _clean_table(engine: Engine, version: str, rule: TableRule, request: Request,
                 result: TableResult, tag: str, live: set[str], fks: cascade.ForeignKeys,
                 sizes: Sizer,
                 on_chunk: ChunkHook | None,
                 on_progress: Callable[[TableResult], None] | None) -> None:
    with engine.connect() as conn:
        t = sql.reflect(conn, rule.table)
        cond = sql.eligible(conn, rule, t, request.before, request.dag_ids,
                            request.exclude_dag_ids, request.protect_unfinished)
        dependants = _dependants(conn, fks, t)
    archive = None
    cascades: dict[str, Table] = {}
    if not request.skip_archive:
        result.archive = _archive_name(tag, rule.table, live)
        with engine.begin() as conn:
            archive = sql.create_archive(conn, t, result.archive)
        live.add(result.archive)
        log.info("db_clean_archive_created", table=rule.table, archive=result.archive)
        # The rows the chunk's dependant batches delete that Airflow archives with the
        # cascade (3.4: the attempt tables under task_instance and dag_run).
        cascades = cascade.cascade_archives(engine, version, rule.table, result.archive,
                                            [target for _, target, _ in dependants])
        live.update(a.name for a in cascades.values())
    dependants = pre_deleted(rule, dependants, cascades)
    lo: sql.Key | None = None
    while True:
        t0 = time.monotonic()
        hi = _in_transaction(engine, request, rule.table, partial(
            sql.next_bound, t=t, cond=cond, lo=lo, batch_size=request.batch_size))
        if dependants:
            # The chunk's dependants first, batch by batch, so its own DELETE cascades into
            # (almost) nothing.
            result.dependants += _delete_dependants(engine, request, dependants, t,
                                                    [*cond, *sql.in_range(t, lo, hi)], sizes,
                                                    cascades)
        rows, slices = move_slices(engine, request, t, archive, cond, lo, hi, sizes, on_chunk)
        result.chunks += 1
        result.deleted += rows
        log.info("db_clean_chunk_moved", table=rule.table, lo=lo, hi=hi, rows=rows,
                 transactions=slices, ms=round((time.monotonic() - t0) * 1000, 1))
        if on_progress is not None:
            on_progress(result)
        if hi is None:
            return
        lo = hi


def move_slices(engine: Engine, request: Request, t: Table, archive: Table | None,
                cond: list[Any], lo: sql.Key | None, hi: sql.Key | None, sizes: Sizer,
                on_chunk: ChunkHook | None = None) -> tuple[int, int]:
    """Archive and delete a chunk's eligible rows, (lo, hi], in slices of as many rows as the
    table's recent transactions say fit in the target time, each slice one transaction (its
    archive and its delete commit together, the rule re-checked; its end is read just before).
    A chunk stays --batch-size rows, so what a chunk costs once (its message, its dependants'
    searches) is paid once however small its slices. (rows moved, transactions)."""
    rows = slices = 0
    bounded = sql.in_range(t, None, hi)
    while True:
        size = sizes.size(t.name)

        # The size-th eligible row up to hi ends the slice; fewer left: the slice is the rest.
        # Read in a transaction of its own, before the slice's, which then holds its row locks
        # for its move alone (on MariaDB a dag_run bound computes keep-last's GROUP BY, which
        # the move's own re-check of the rule computes again). A row that became eligible in
        # between, inside the slice's keys, goes with it.
        end = _in_transaction(engine, request, t.name, partial(
            sql.next_bound, t=t, cond=[*cond, *bounded], lo=lo, batch_size=size))

        def move(conn: Connection, lo: sql.Key | None = lo,
                 end: sql.Key | None = end) -> tuple[int, sql.Key | None]:
            moved = sql.move_chunk(conn, t, archive, cond, lo, hi if end is None else end)
            if on_chunk is not None:
                on_chunk(t.name, moved)
            return moved, end

        def note(seconds: float, result: tuple[int, sql.Key | None] | None,
                 size: int = size) -> None:
            moved, end = result if result is not None else (0, None)
            # A slice that is not the chunk's last was cut for exactly the rows it found.
            planned = size if end is None else max(1, moved)
            sizes.note(t.name, Timing(planned, moved, seconds, result is None))

        t0 = time.monotonic()
        moved, end = _in_transaction(engine, request, t.name, move, note)
        rows += moved
        slices += 1
        log.info("db_clean_slice_moved", table=t.name, rows=moved, size=size,
                 ms=round((time.monotonic() - t0) * 1000, 1))
        if end is None:
            return rows, slices
        lo = end


Dependant = tuple[cascade.Path, Table, dict[str, Table]]


def _dependants(conn: Connection, fks: cascade.ForeignKeys, t: Table) -> list[Dependant]:
    """What a chunk of *t* deletes first: each cascade path to a table with a primary key
    (one without is left to the cascade), deepest first; none when the tree can refuse."""
    paths = fks.cascade_paths(t.name)
    if paths is None:
        log.info("db_clean_cascade_inline", table=t.name,
                 reason="a referrer can refuse the delete (RESTRICT or NO ACTION)")
        return []
    tables: dict[str, Table] = {t.name: t}
    out: list[Dependant] = []
    for path in paths:
        for edge in path:
            if edge.child not in tables:
                tables[edge.child] = sql.reflect(conn, edge.child)
        target = tables[path[-1].child]
        if sql.key_columns(target):
            out.append((path, target, tables))
    return out


def pre_deleted(rule: TableRule, dependants: list[Dependant],
                archives: dict[str, Table]) -> list[Dependant]:
    """The dependants a chunk of *rule*'s table deletes first: all of them, unless a row's
    cascade is bounded (``cascade_in_slices``: task_instance), where only those whose rows go
    to an archive (*archives*: Airflow 3.4's attempt tables, when archiving) are; the rest go
    with each slice's DELETE, whose time, cascade included, sizes the next slice. Searching a
    task instance chunk's XComs and reschedules first, then deleting the task instances, whose
    foreign-key triggers look for them again, took a task_instance chunk 400 ms against 240 ms
    for its DELETE alone (Airflow 3.3, 10,000 task instances)."""
    if not rule.cascade_in_slices:
        return dependants
    return [d for d in dependants if d[1].name in archives]


#: Forward batches a window of the dependants' last pass covers (a window's search walks the
#: rows those batches deleted, now dead index entries: a few ms a batch).
LAST_PASS_BATCHES = 8


def _delete_dependants(engine: Engine, request: Request, dependants: list[Dependant],
                       t: Table, root_cond: list[Any], sizes: Sizer,
                       archives: dict[str, Table] | None = None) -> int:
    """Each dependant table's rows under the chunk, in batches, each copied into its table's
    archive of *archives* (cascade.cascade_archives), if it has one, in the same transaction.

    A batch is sized by time as a chunk is (never above the batch size), from the recent
    batches of the same dependant under the same parent (``dependant_key``): 10,000 task
    instances and their cascades took 600 ms, three times the target. Each batch's search
    walks the indexes down from the chunk (cascade.batch_query), so more, smaller batches cost
    little. A batch's time also counts towards the parent's longest transaction."""
    total = 0
    for path, target, tables in dependants:
        key = dependant_key(t.name, target.name)
        archive = (archives or {}).get(target.name)

        def batch(after: sql.Key | None, until: sql.Key | None, path: cascade.Path = path,
                  target: Table = target, tables: dict[str, Table] = tables,
                  key: str = key, archive: Table | None = archive,
                  ) -> tuple[int, sql.Key | None, int]:
            size = sizes.size(key)
            t0 = time.monotonic()
            found, search_ms = None, 0.0
            if sql.is_mysql(engine):
                # MySQL/MariaDB search without a lock anyway: in a transaction of its own,
                # before the batch's, which then holds its locks for the rule's check, the
                # locks and the move alone.
                found = _in_transaction(engine, request, target.name, partial(
                    cascade.find_batch, tables=tables, path=path, root_cond=root_cond,
                    batch_size=size, after=after, until=until))
                search_ms = round((time.monotonic() - t0) * 1000, 1)
                if not found:
                    return 0, None, size
                t0 = time.monotonic()
            rows, last = _in_transaction(engine, request, target.name, partial(
                cascade.delete_batch_from, tables=tables, path=path, root_cond=root_cond,
                batch_size=size, archive=archive, after=after, until=until, found=found),
                both(timed(sizes, key, size, first), timed(sizes, t.name, size, first,
                                                           evidence=False)))
            if rows:
                log.info("db_clean_dependants_deleted", table=t.name, dependant=target.name,
                         rows=rows, size=size, ms=round((time.monotonic() - t0) * 1000, 1),
                         **({"search_ms": search_ms} if found is not None else {}))
            return rows, last, size

        # Forward, each batch from the root row the last one ended on, until one finds none.
        after: sql.Key | None = None
        marks: list[sql.Key] = []  # the root rows the batches ended on
        while True:
            rows, last, size = batch(after, None)
            total += rows
            if size <= 0 or rows == 0 or last is None:
                break
            marks.append(last)
            after = last
        if size <= 0 or not marks or archive is None:
            continue
        # Then, for a dependant that goes to an archive, once more over the same roots: on
        # MariaDB a batch locks what its unlocked search found, and rows another transaction
        # took meanwhile make it short, not the last; on PostgreSQL a row another transaction
        # changed while a batch waited for it stays. The parent's own DELETE would cascade to
        # such a row without archiving it. (One that is not archived is left to that cascade:
        # a few rows, where this pass costs a search of the whole chunk.) The roots after the
        # last mark are not searched again: the forward pass's last batch, after every other,
        # found none there. The rest goes in windows of LAST_PASS_BATCHES forward batches, a
        # transaction each: in one search from the chunk's start it walked a dag_run chunk's
        # 100,000 task instances for their dead xcom entries, 420-560 ms at the size.
        for lo, hi in last_pass_windows(marks):
            after = lo
            while True:
                rows, last, _ = batch(after, hi)
                total += rows
                if rows == 0 or last is None:
                    break
                after = last
    return total


def last_pass_windows(marks: list[sql.Key],
                      per: int = LAST_PASS_BATCHES) -> list[tuple[sql.Key | None, sql.Key]]:
    """The dependants' last pass, as (after, until) root-key windows (both inclusive): from the
    chunk's start to the last root a forward batch ended on (*marks*, in order), *per* forward
    batches a window."""
    if not marks:
        return []
    ends = [*marks[per - 1:-1:per], marks[-1]]
    return list(zip([None, *ends[:-1]], ends, strict=True))


def first(result: tuple[int, Any]) -> int:
    return result[0]


def dependant_key(parent: str, dependant: str) -> str:
    """The name a parent's dependant batches are timed under (never a table's name)."""
    return f"{parent}>{dependant}"


def both(*notes: Callable[[float, Any], None]) -> Callable[[float, Any], None]:
    def note(seconds: float, result: Any) -> None:
        for n in notes:
            n(seconds, result)
    return note


def timed(sizes: Sizer, table: str, size: int, rows_of: Callable[[Any], int],
          evidence: bool | None = None) -> Callable[[float, Any], None]:
    """What _in_transaction calls once a transaction of *table* sized *size* is over: its
    seconds and result (None: it gave up on a lock) become one of the table's timings."""
    def note(seconds: float, result: Any) -> None:
        sizes.note(table, Timing(size, 0 if result is None else rows_of(result), seconds,
                                 result is None), evidence)
    return note


#: How often a transaction that hit its lock timeout is retried before its table fails.
LOCK_RETRIES = 5
R = TypeVar("R")


def _in_transaction(engine: Engine, request: Request, table: str,
                    work: Callable[[Connection], R],
                    note: Callable[[float, R | None], None] | None = None) -> R:
    """*work* in a transaction of its own whose lock wait and statements are bounded (so a
    chunk never queues writers behind it for long); one that waited too long for a lock rolled
    back whole and is tried again, a little later. *note* hears each try's seconds, from
    BEGIN to the end of COMMIT, and its result (None: it gave up on a lock)."""
    tried = 0
    while True:
        t0 = time.perf_counter()
        try:
            with engine.begin() as conn:
                set_timeouts(conn, request.lock_timeout_ms, request.statement_timeout_ms)
                if conn.dialect.name == "postgresql" and \
                        (conn.dialect.server_version_info or (0,)) >= (14,):
                    # A chunk cut short mid-statement (its soft time limit, raised inside the
                    # driver) leaves its connection to be closed, not cancelled: the server
                    # would run the orphaned DELETE on to its statement timeout, holding its
                    # row locks against the chunk's own retry. It now notices within a second.
                    conn.exec_driver_sql("SET LOCAL client_connection_check_interval = 1000")
                result = work(conn)
            if note is not None:
                note(time.perf_counter() - t0, result)
            return result
        except OperationalError as exc:
            text = str(exc.orig or exc).lower()
            if ("lock timeout" not in text and "lock wait timeout" not in text) \
                    or tried >= LOCK_RETRIES:
                raise
            if note is not None:
                note(time.perf_counter() - t0, None)
            log.warning("db_clean_retry", table=table, reason="lock timeout", retries=tried)
            time.sleep(min(5.0, 0.2 * 2 ** tried))
            tried += 1
