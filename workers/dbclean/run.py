"""A ``db-clean`` run in this process: Airflow's tables in Airflow's order, each cut into keyset
chunks of at most ``batch_size`` eligible rows, each chunk archived and deleted in one
transaction of its own (:func:`workers.dbclean.statements.move_chunk`).

The archive table of a table is made once per run, before its first chunk, and named as Airflow
names it, ``_airflow_deleted__<table>__<YYYYmmddHHMMSS>``, the time being the database's clock
at the start of the run. ``skip_archive`` makes none.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection, Engine, Table, inspect
from sqlalchemy.exc import DBAPIError, OperationalError

from workers.db import db_now, set_timeouts
from workers.dbclean import cascade
from workers.dbclean import statements as sql
from workers.dbclean.rules import ARCHIVE_PREFIX, TableRule, airflow_version, effective_tables

log = structlog.get_logger("statesweep.dbclean")

#: Called inside each chunk's transaction after its move, before commit: (table, rows).
ChunkHook = Callable[[str, int], None]


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


def run_tag(now: dt.datetime) -> str:
    """Airflow's archive suffix: the time as 14 digits."""
    return now.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S")


def plan(engine: Engine, request: Request) -> tuple[str, list[TableRule]]:
    """The Airflow version and the rules to run, dependants first; bad --tables raises before
    anything is read but the schema."""
    version = airflow_version(engine)
    return version, effective_tables(version, request.tables)


def clean(engine: Engine, request: Request, *, on_chunk: ChunkHook | None = None,
          on_progress: Callable[[TableResult], None] | None = None) -> Report:
    """Run *request* (count only, with ``dry_run``); returns what each table did."""
    version, rules = plan(engine, request)
    report = Report(version, request.before, request.dry_run)
    live = set(inspect(engine).get_table_names())
    filtered = bool(request.dag_ids or request.exclude_dag_ids)
    with engine.connect() as conn:
        tag = run_tag(db_now(conn))
        fks = cascade.ForeignKeys(conn)
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
            _clean_table(engine, rule, request, result, tag, live, fks, on_chunk,
                         on_progress)
        except DBAPIError as exc:
            # As Airflow: a table whose statement fails (a RESTRICT foreign key its cascade
            # meets, a lock timeout) is reported and the next table runs. The failed chunk
            # rolled back whole; the chunks before it stay deleted and archived.
            if exc.connection_invalidated:
                raise
            result.failed = " ".join(str(exc.orig or exc).split())[:500]
            log.warning("db_clean_table_failed", table=rule.table, error=result.failed)
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


def _clean_table(engine: Engine, rule: TableRule, request: Request, result: TableResult,
                 tag: str, live: set[str], fks: cascade.ForeignKeys, on_chunk: ChunkHook | None,
                 on_progress: Callable[[TableResult], None] | None) -> None:
    with engine.connect() as conn:
        t = sql.reflect(conn, rule.table)
        cond = sql.eligible(conn, rule, t, request.before, request.dag_ids,
                            request.exclude_dag_ids, request.protect_unfinished)
        dependants = _dependants(conn, fks, t)
    archive = None
    if not request.skip_archive:
        result.archive = _archive_name(tag, rule.table, live)
        with engine.begin() as conn:
            archive = sql.create_archive(conn, t, result.archive)
        live.add(result.archive)
        log.info("db_clean_archive_created", table=rule.table, archive=result.archive)
    lo: sql.Key | None = None
    while True:
        t0 = time.monotonic()
        hi: sql.Key | None = None
        if dependants:
            hi = _in_transaction(engine, request, rule.table, partial(
                sql.next_bound, t=t, cond=cond, lo=lo, batch_size=request.batch_size))
            # The chunk's dependants first, batch by batch, so its own DELETE cascades into
            # (almost) nothing.
            result.dependants += _delete_dependants(engine, request, dependants, t,
                                                    [*cond, *sql.in_range(t, lo, hi)])
        # One transaction per chunk: its archive and its delete commit together (and, without
        # dependants, its cut).
        rows, hi = _in_transaction(engine, request, rule.table, partial(
            _move, t=t, archive=archive, cond=cond, lo=lo, hi=hi, cut=not dependants,
            batch_size=request.batch_size, on_chunk=on_chunk))
        result.chunks += 1
        result.deleted += rows
        log.info("db_clean_chunk_moved", table=rule.table, lo=lo, hi=hi, rows=rows,
                 ms=round((time.monotonic() - t0) * 1000, 1))
        if on_progress is not None:
            on_progress(result)
        if hi is None:
            return
        lo = hi


def _move(conn: Connection, *, t: Table, archive: Table | None, cond: list[Any],
          lo: sql.Key | None, hi: sql.Key | None, cut: bool, batch_size: int,
          on_chunk: ChunkHook | None) -> tuple[int, sql.Key | None]:
    if cut:
        hi = sql.next_bound(conn, t, cond, lo, batch_size)
    rows = sql.move_chunk(conn, t, archive, cond, lo, hi)
    if on_chunk is not None:
        on_chunk(t.name, rows)
    return rows, hi


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


def _delete_dependants(engine: Engine, request: Request, dependants: list[Dependant],
                       t: Table, root_cond: list[Any]) -> int:
    total = 0
    for path, target, tables in dependants:
        while True:
            rows = _in_transaction(engine, request, target.name, partial(
                cascade.delete_batch, tables=tables, path=path, root_cond=root_cond,
                batch_size=request.batch_size))
            total += rows
            if rows:
                log.info("db_clean_dependants_deleted", table=t.name, dependant=target.name,
                         rows=rows)
            if request.batch_size <= 0 or rows < request.batch_size:
                break
    return total


#: How often a transaction that hit its lock timeout is retried before its table fails.
LOCK_RETRIES = 5
R = TypeVar("R")


def _in_transaction(engine: Engine, request: Request, table: str,
                    work: Callable[[Connection], R]) -> R:
    """*work* in a transaction of its own whose lock wait and statements are bounded (so a
    chunk never queues writers behind it for long); one that waited too long for a lock rolled
    back whole and is tried again, a little later."""
    tried = 0
    while True:
        try:
            with engine.begin() as conn:
                set_timeouts(conn, request.lock_timeout_ms, request.statement_timeout_ms)
                return work(conn)
        except OperationalError as exc:
            text = str(exc.orig or exc).lower()
            if ("lock timeout" not in text and "lock wait timeout" not in text) \
                    or tried >= LOCK_RETRIES:
                raise
            log.warning("db_clean_retry", table=table, reason="lock timeout", retries=tried)
            time.sleep(min(5.0, 0.2 * 2 ** tried))
            tried += 1
