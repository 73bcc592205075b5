"""What bench.dbclean_compare measures beside a cleanup's wall time: the longest transaction
the cleanup holds open, and what a writer on the cleaned tables sees meanwhile.

- ``TransactionSampler``: a thread that reads the server's open transactions every 20 ms
  (PostgreSQL: pg_stat_activity.xact_start; MariaDB: information_schema.innodb_trx.trx_started
  of the connections to that database) and keeps the oldest age seen, leaving out the writer
  and itself; and the oldest of those that wrote (PostgreSQL: backend_xid set; MariaDB:
  trx_rows_modified > 0, or a DELETE/INSERT/UPDATE/CREATE statement), which hold row locks.
  A transaction shorter than the interval may be missed; a long one is not.
- ``Writer``: a thread doing what a busy Airflow does to the cleaned tables, one statement per
  transaction, in turn: INSERT into log, UPDATE a dag_run, UPDATE a job (rows both tools keep).
  Its latencies are cut into an idle window (before the cleanup starts) and the run's window.
  Its log rows carry event = 'dbc_writer' and are deleted before the tables are compared.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, create_engine, text

WRITER_APP = "dbc_writer"
WRITER_EVENT = "dbc_writer"
#: A transaction older than this is printed to stderr as it is seen (who, first statement).
LONG_MS = 1000.0


def engine_for(url: str, app: str) -> Engine:
    if url.startswith("postgresql"):
        return create_engine(url.replace("postgresql://", "postgresql+psycopg://"),
                             connect_args={"application_name": app})
    return create_engine(url.replace("mysql://", "mysql+pymysql://"),
                         connect_args={"init_command": "SET time_zone = '+00:00'"})


class TransactionSampler(threading.Thread):
    def __init__(self, url: str, database: str, exclude: set[int]) -> None:
        super().__init__(daemon=True)
        self.engine = engine_for(url.rsplit("/", 1)[0] + "/" + database, "dbc_sampler")
        self.pg = url.startswith("postgresql")
        self.database = database
        self.exclude = exclude  # connection ids of the writer
        self.longest_ms = 0.0
        self.longest_query = ""
        self.longest_write_ms = 0.0  # of transactions that wrote (hold row locks)
        self.longest_write_query = ""
        #: (pid, xact_start) -> who held it and the first statement seen in it (PostgreSQL)
        self.seen: dict[tuple[Any, Any], str] = {}
        self.printed: set[tuple[Any, Any]] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            (self._sample_pg if self.pg else self._sample_mariadb)(conn)
        self.engine.dispose()

    def _seen(self, ms: float, query: Any, writing: bool) -> None:
        if ms > self.longest_ms:  # and the statement running when it was seen
            self.longest_ms, self.longest_query = ms, str(query)
        if writing and ms > self.longest_write_ms:
            self.longest_write_ms, self.longest_write_query = ms, str(query)

    def _sample_pg(self, conn: Any) -> None:
        """Each transaction is named by who held it (application_name: the bench's workers and
        command set PGAPPNAME; the backend type otherwise) and the first statement seen in it:
        the last one alone (a pool's ROLLBACK) says nothing about a long idle one."""
        # backend_xid: the transaction has written (it holds row locks), not only read.
        query = text("SELECT left(query, 200), extract(epoch FROM now() - xact_start) * 1000, "
                     "backend_xid IS NOT NULL, pid, xact_start, state, "
                     "coalesce(nullif(application_name, ''), backend_type) "
                     "FROM pg_stat_activity WHERE datname = :db AND xact_start IS NOT NULL "
                     "AND pid <> pg_backend_pid() AND application_name <> :writer")
        while not self.stop.is_set():
            for q, ms, writing, pid, started, state, app in conn.execute(
                    query, {"db": self.database, "writer": WRITER_APP}):
                key = (pid, started)
                if key not in self.seen:
                    first = " ".join(str(q).split())[:80]
                    self.seen[key] = f"[{app} pid {pid}, began with: {first}]"
                ms = float(ms or 0)
                label = f"{self.seen[key]} {state}: {q}"
                if ms > LONG_MS and key not in self.printed:  # once, as it crosses the mark
                    self.printed.add(key)
                    print(f"  long transaction: {label[:300]}", file=sys.stderr)
                self._seen(ms, label, bool(writing))
            if len(self.seen) > 100_000:
                self.seen.clear()
                self.printed.clear()
            time.sleep(0.02)

    def _sample_mariadb(self, conn: Any) -> None:
        """InnoDB refreshes innodb_trx only when it was not read for 100 ms, and its
        trx_started has whole seconds: a transaction is timed from its first to its last sight
        every 160 ms, capped by its age from trx_started (so within about -0.2 s..+1 s), and
        each statement by processlist.time_ms every 20 ms."""
        statements = text("SELECT id, left(info, 200), time_ms FROM information_schema."
                          "processlist WHERE db = :db AND command = 'Query' "
                          "AND id <> CONNECTION_ID()")
        trx = text("SELECT trx_id, trx_mysql_thread_id, left(trx_query, 200), "
                   "trx_rows_modified > 0, trx_started, "
                   "TIMESTAMPDIFF(MICROSECOND, trx_started, NOW(6)) / 1000 "
                   "FROM information_schema.innodb_trx")
        first: dict[str, float] = {}
        ours: set[int] = set()
        n = 0
        while not self.stop.is_set():
            for thread, info, ms in conn.execute(statements, {"db": self.database}):
                if int(thread) not in self.exclude:
                    ours.add(int(thread))
                    self._seen(float(ms or 0), info, str(info or "").lstrip().upper()
                               .startswith(("DELETE", "INSERT", "UPDATE", "CREATE")))
            if n % 8 == 0:
                now = time.monotonic()
                for trx_id, thread, info, writing, started, upper in conn.execute(trx):
                    if int(thread) in ours:
                        # A read-only transaction's trx_id is reused by the connection's next
                        # one: its start (whole seconds) tells them apart, and bounds the age.
                        key = f"{trx_id}/{thread}/{started}"
                        first.setdefault(key, now)
                        self._seen(min((now - first[key]) * 1000, float(upper or 0)), info,
                                   bool(writing))
            n += 1
            time.sleep(0.02)

    def finish(self) -> float:
        self.stop.set()
        self.join()
        return round(self.longest_ms, 1)


@dataclass(eq=False)
class Writer(threading.Thread):
    url: str
    dag_run_ids: list[int]
    job_ids: list[int]
    rate: float = 30.0
    samples: list[tuple[float, float]] = field(default_factory=list)
    connection_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, daemon=True)
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        engine = engine_for(self.url, WRITER_APP)
        pg = self.url.startswith("postgresql")
        statements = [
            (text("INSERT INTO log (dttm, dag_id, event) VALUES (CURRENT_TIMESTAMP, 'dag_1', "
                  ":event)").bindparams(event=WRITER_EVENT), None),
            (text("UPDATE dag_run SET updated_at = CURRENT_TIMESTAMP WHERE id = :id"),
             self.dag_run_ids),
            (text("UPDATE job SET hostname = 'dbc_writer' WHERE id = :id"), self.job_ids)]
        n = 0
        with engine.connect() as conn:
            if not pg:
                self.connection_ids.add(int(conn.execute(text("SELECT CONNECTION_ID()"))
                                            .scalar_one()))
            conn.commit()
            self.ready.set()
            next_at = time.monotonic()
            while not self.stop.is_set():
                statement, ids = statements[n % len(statements)]
                params: dict[str, Any] = {"id": ids[n % len(ids)]} if ids else {}
                t0 = time.perf_counter()
                try:
                    conn.execute(statement, params)
                    conn.commit()
                except Exception:  # a lock wait timeout is a latency too: the longest
                    conn.rollback()
                self.samples.append((time.monotonic(), (time.perf_counter() - t0) * 1000))
                n += 1
                next_at = max(next_at + 1.0 / self.rate, time.monotonic())
                time.sleep(max(0.0, next_at - time.monotonic()))
        engine.dispose()

    def finish(self) -> None:
        self.stop.set()
        self.join()

    def p99(self, start: float, end: float) -> float | None:
        window = sorted(ms for at, ms in self.samples if start <= at < end)
        if not window:
            return None
        return round(window[min(len(window) - 1, int(len(window) * 0.99))], 1)


def kept_ids(url: str, before: str) -> tuple[list[int], list[int]]:
    """dag_run and job ids both tools keep (a day newer than the cutoff), up to 500 each."""
    engine = engine_for(url, "dbc_probe")
    after = before.replace("2026-06-01", "2026-06-02").replace("T", " ").split("+")[0]
    try:
        with engine.connect() as conn:
            runs = [int(r) for r in conn.execute(text(
                "SELECT id FROM dag_run WHERE start_date > :t ORDER BY id LIMIT 500"),
                {"t": after}).scalars()]
            jobs = [int(r) for r in conn.execute(text(
                "SELECT id FROM job WHERE latest_heartbeat > :t ORDER BY id LIMIT 500"),
                {"t": after}).scalars()]
    finally:
        engine.dispose()
    return runs, jobs


def drop_writer_rows(url: str) -> None:
    engine = engine_for(url, "dbc_probe")
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM log WHERE event = :e"), {"e": WRITER_EVENT})
    finally:
        engine.dispose()


def uptime() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])
