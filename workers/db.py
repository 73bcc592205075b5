"""Engines, the database clock, and per-transaction timeouts for each supported dialect.

Engines are made per process: a pool carried across fork would share sockets between a worker's
children, so :func:`get_engine` keys its cache on the pid.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    String,
    bindparam,
    create_engine,
    event,
    func,
    literal_column,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import ColumnElement

from workers.db_urls import DRIVERS, MISSING_DRIVER, SUPPORTED

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}


def normalise_url(url: str) -> str:
    """*url* with its driver mapped onto psycopg 3 or PyMySQL, query options kept.

    ValueError says what is wrong with a URL statesweep cannot serve; its message never
    quotes the URL (SQLAlchemy's own would, password and all), so callers add the masked one.
    """
    try:
        u = make_url(url)
        u.port  # noqa: B018 - a malformed port raises here, not at connect time
    except (ArgumentError, ValueError):
        raise ValueError(
            "is not a database URL (expected e.g. postgresql://user@host:5432/db)") from None
    driver = DRIVERS.get(u.drivername.lower())
    if driver is None:
        scheme, _, dbapi = u.drivername.partition("+")
        what = (f"driver {dbapi!r} is not supported" if dbapi and f"{scheme}" in
                {d.partition("+")[0] for d in DRIVERS} else f"scheme {scheme!r} is not supported")
        raise ValueError(f"{what}; statesweep serves {SUPPORTED}")
    if not u.database and driver != "sqlite":
        raise ValueError("names no database (expected e.g. postgresql://user@host:5432/db)")
    if driver == "sqlite" and u.database in (None, "", ":memory:"):
        raise ValueError("names no database file (expected e.g. sqlite:////path/to/state.db); "
                         "an in-memory database is not shared by workers")
    return u.set(drivername=driver).render_as_string(hide_password=False)


def check_connect_options(url: str) -> None:
    """ValueError if the driver for *url* is not installed or would reject one of its query
    options: checked when settings load, so a worker fails at start-up with one line, not at
    its first connection with a TypeError from the driver. Never quotes a value."""
    u = make_url(normalise_url(url))
    if u.get_backend_name() == "sqlite":
        return
    if not u.query:
        # Nothing for the driver to reject: only whether it is installed, found without
        # importing it (psycopg alone is a sixth of the CLI's start-up).
        import importlib.util

        if importlib.util.find_spec(u.get_driver_name()) is None:
            raise ValueError(MISSING_DRIVER.get(u.get_driver_name(),
                                                f"needs the {u.get_driver_name()} driver"))
        return
    dialect_cls = u.get_dialect()
    try:
        dbapi = dialect_cls.import_dbapi()
    except ImportError:
        raise ValueError(MISSING_DRIVER["pymysql"]) from None
    _, params = dialect_cls(dbapi=dbapi).create_connect_args(u)  # type: ignore[call-arg]
    if u.get_backend_name() == "postgresql":
        from psycopg import ProgrammingError
        from psycopg.conninfo import make_conninfo

        try:
            make_conninfo("", **{k: v for k, v in params.items() if k != "context"})
        except ProgrammingError as exc:  # 'invalid connection option "x"': the name only
            raise ValueError(
                f"has a query option libpq does not know ({str(exc).strip()})") from None
        return
    import inspect

    accepted = set(inspect.signature(dbapi.connections.Connection.__init__).parameters)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"has query options PyMySQL, statesweep's MySQL driver, does not "
                         f"take: {', '.join(unknown)}")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """A new engine with pre-ping; SQLite gets foreign keys on and a busy timeout."""
    url = normalise_url(url)
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        kwargs.setdefault("connect_args", {"timeout": 30})
        # One file, many processes: pooling SQLite connections buys nothing and holds locks.
        kwargs.setdefault("poolclass", NullPool)
    engine = create_engine(url, pool_pre_ping=True, **kwargs)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
    elif backend in ("mysql", "mariadb"):
        event.listen(engine, "connect", _mysql_on_connect)
        event.listen(engine, "before_cursor_execute", _mysql_statement_timeouts, retval=True)
        event.listen(engine, "checkin", _mysql_restore_session)
    return engine


def _mysql_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Airflow keeps MySQL timestamps as TIMESTAMP, which the server converts through the
    # session time zone, and pins that zone to UTC; so do we, or a server whose default zone is
    # not UTC would shift every expires_at we read and write by its offset.
    cur = dbapi_conn.cursor()
    cur.execute("SET time_zone = '+00:00'")
    cur.close()


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # ON DELETE CASCADE from dag_run/asset needs this on every SQLite connection.
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


def get_engine(url: str) -> Engine:
    """The engine for *url* in this process, created on first use after any fork."""
    key = (os.getpid(), url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = make_engine(url)
        return engine


def forget_engines_after_fork() -> None:
    """Drop engines inherited from a parent without closing the parent's connections."""
    with _lock:
        for (pid, _), engine in list(_engines.items()):
            if pid != os.getpid():
                engine.dispose(close=False)
        _engines.clear()


# --- the database clock -------------------------------------------------------------------------


def now_expr(dialect: str) -> ColumnElement[Any] | None:
    """SQL for the database's current UTC time, or None where the database is this process
    (SQLite is embedded, so its clock is the local clock)."""
    if dialect == "postgresql":
        return func.now()
    if dialect in ("mysql", "mariadb"):
        return func.utc_timestamp(literal_column("6"))
    return None


def db_now(conn: Connection) -> dt.datetime:
    """The database's clock as an aware UTC datetime."""
    expr = now_expr(conn.dialect.name)
    if expr is None:
        return dt.datetime.now(dt.UTC)
    value = conn.execute(select(expr)).scalar_one()
    if isinstance(value, str):  # pragma: no cover - drivers return datetimes
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def plus(dialect: str, base: ColumnElement[Any], delta: dt.timedelta) -> ColumnElement[Any]:
    """``base + delta`` in the database's own arithmetic."""
    if dialect == "postgresql":
        return base + delta
    micros = int(delta / dt.timedelta(microseconds=1))
    return func.timestampadd(literal_column("MICROSECOND"), micros, base)


def set_timeouts(conn: Connection, lock_timeout_ms: int, statement_timeout_ms: int) -> None:
    """Bound how long this transaction may wait for locks and run; a chunk never blocks writers
    for long, and a stuck chunk fails and retries rather than holding locks.

    The bounds never outlive the transaction: a pooled connection carries later planning and
    run-store statements that must not inherit a chunk's one-second lock wait.
    """
    name = conn.dialect.name
    if name == "postgresql":
        # SET LOCAL lasts until the end of the current transaction only.
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}")
        conn.exec_driver_sql(
            f"SET LOCAL idle_in_transaction_session_timeout = {int(statement_timeout_ms)}")
    elif name in ("mysql", "mariadb"):
        seconds = max(1, int(lock_timeout_ms) // 1000)
        if getattr(conn.dialect, "is_mariadb", False):
            # MariaDB scopes variables to one statement (SET STATEMENT … FOR); the engine's
            # before_cursor_execute hook prefixes each statement of this Connection with them.
            conn.execution_options(**{_SCOPED: (
                f"SET STATEMENT innodb_lock_wait_timeout={seconds},"
                f" max_statement_time={int(statement_timeout_ms) / 1000:.3f} FOR ")})
        else:
            # MySQL has no SET STATEMENT, and its MAX_EXECUTION_TIME hint bounds SELECTs only,
            # so a DELETE gets the lock wait bound alone (the chunk's hard time limit bounds
            # the rest). The session value is put back when the connection returns to the pool.
            dbapi_conn = conn.connection.dbapi_connection
            cur = dbapi_conn.cursor()  # type: ignore[union-attr]
            cur.execute("SELECT @@SESSION.innodb_lock_wait_timeout")
            previous = int(cur.fetchone()[0])  # type: ignore[index]
            cur.execute(f"SET SESSION innodb_lock_wait_timeout = {seconds}")
            cur.close()
            conn.connection.info.setdefault(_RESTORE, previous)


# Connection execution option holding a MariaDB statement prefix, and connection-record info
# key holding the MySQL session value to restore at check-in.
_SCOPED = "statesweep_statement_prefix"
_RESTORE = "statesweep_restore_lock_wait_timeout"


def _mysql_statement_timeouts(conn: Connection, _cursor: Any, statement: str, parameters: Any,
                              context: Any, _executemany: bool) -> tuple[str, Any]:
    prefix = conn.get_execution_options().get(_SCOPED)
    if prefix and statement.lstrip()[:6].upper() in ("SELECT", "DELETE", "UPDATE", "INSERT"):
        statement = prefix + statement
    return statement, parameters


def _mysql_restore_session(dbapi_conn: Any, record: Any) -> None:
    previous = record.info.pop(_RESTORE, None)
    if previous is None or dbapi_conn is None:
        return
    cur = dbapi_conn.cursor()
    cur.execute(f"SET SESSION innodb_lock_wait_timeout = {int(previous)}")
    cur.close()


def begin_chunk(conn: Connection, lock_timeout_ms: int,
                statement_timeout_ms: int) -> tuple[dt.datetime, int | None]:
    """Start a chunk's transaction: bound its lock wait and run time and read the database
    clock, in one round trip on PostgreSQL. Returns the clock and, on PostgreSQL, the
    transaction's id (what workers.chunk.CommitNotes notes before the COMMIT; read here, it
    costs no round trip of its own).

    PostgreSQL also gets ``synchronous_commit = off`` for this transaction only: the commit
    returns before its WAL is flushed. A crash can then lose the last few chunks' deletes, and
    those rows come back still expired, for the next run to delete; no live row is at risk, and
    chunks stop waiting on a disk flush each.
    """
    if conn.dialect.name == "postgresql":
        row = conn.execute(_PG_BEGIN_CHUNK, {"lock": str(int(lock_timeout_ms)),
                                             "statement": str(int(statement_timeout_ms))}).one()
        now: dt.datetime = row[4]
        return now.astimezone(dt.UTC), int(row[5])
    set_timeouts(conn, lock_timeout_ms, statement_timeout_ms)
    return db_now(conn), None


# Built once: a chunk binds only its two timeouts, so SQLAlchemy neither builds the statement
# nor computes its cache key again for every chunk.
_PG_BEGIN_CHUNK = select(
    func.set_config("lock_timeout", bindparam("lock", type_=String), True),
    func.set_config("statement_timeout", bindparam("statement", type_=String), True),
    func.set_config("synchronous_commit", "off", True),
    # A client that vanishes mid-chunk (its host cut off the network, so no FIN ever arrives)
    # leaves its transaction idle, holding row locks: PostgreSQL ends it, and rolls it back,
    # after this long. TCP keepalives would take minutes to notice.
    func.set_config("idle_in_transaction_session_timeout",
                    bindparam("statement", type_=String), True),
    func.now(),
    # Assigns the transaction its id now rather than at the DELETE: a chunk that deletes
    # nothing commits an empty transaction (synchronous_commit is off: no flush).
    func.txid_current(),
)
