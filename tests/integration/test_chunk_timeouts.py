"""A chunk's lock-wait and statement bounds last for its own transaction only (MariaDB).

The connection pool hands the same connection to planning, the run store's database reads and
the next chunk; none of them may inherit a chunk's one-second lock wait or its statement limit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError, OperationalError

from tests.conftest import database_now
from tests.reliability.faults import hold_row_lock
from workers.cleanup import delete_range, sweep_orphaned_asset_state
from workers.db import make_engine, set_timeouts
from workers.planners import ChunkRange
from workers.schema import Tables, build_tables, upgrade
from workers.seed import SeedSpec, kind_of, seed

pytestmark = pytest.mark.integration

WHOLE = ChunkRange("ids", 1, 10**9)  # every id: one chunk over the whole table

SESSION = text("SELECT CONNECTION_ID(), @@SESSION.innodb_lock_wait_timeout,"
               " @@SESSION.max_statement_time")
SPEC = SeedSpec(rows=400)


@pytest.fixture
def one_connection(mariadb_url: str) -> Iterator[tuple[Engine, Tables]]:
    # One pooled connection: every statement below runs on the very session a chunk used.
    engine = make_engine(mariadb_url, pool_size=1, max_overflow=0)
    upgrade(engine)
    tables = build_tables("seed")
    seed(engine, tables, SPEC, database_now(engine))
    yield engine, tables
    engine.dispose()


def session(engine: Engine) -> tuple[int, int, float]:
    with engine.connect() as conn:
        cid, lock_wait, statement_time = conn.execute(SESSION).one()
    return int(cid), int(lock_wait), float(statement_time)


def test_defect_mariadb_chunk_timeouts_do_not_outlive_the_transaction(
        one_connection: tuple[Engine, Tables]) -> None:
    engine, tables = one_connection
    before = session(engine)
    deleted = delete_range(engine, tables, WHOLE, database_now(engine),
                           lock_timeout_ms=1000, statement_timeout_ms=2500)
    after_chunk = session(engine)
    sweep_orphaned_asset_state(engine, tables, 10, lock_timeout_ms=1000,
                               statement_timeout_ms=2500)
    after_sweep = session(engine)
    assert deleted == sum(kind_of(i, SPEC) == "expired" for i in range(SPEC.rows)) > 0
    # Same connection, same session settings: the chunk's bounds went with its statements.
    assert after_chunk == before
    assert after_sweep == before


def test_mariadb_chunk_still_gives_up_on_a_held_row_lock(
        one_connection: tuple[Engine, Tables], mariadb_url: str) -> None:
    engine, tables = one_connection
    first_expired = next(i + 1 for i in range(SPEC.rows) if kind_of(i, SPEC) == "expired")
    other = make_engine(mariadb_url)
    try:
        with hold_row_lock(other, tables.task_state.name, first_expired):
            # The server default lock wait is 50 s; the chunk's own 1 s bound must apply.
            with pytest.raises(OperationalError) as caught:
                delete_range(engine, tables, WHOLE, database_now(engine),
                             lock_timeout_ms=1000, statement_timeout_ms=2500)
    finally:
        other.dispose()
    assert caught.value.orig.args[0] == 1205  # ER_LOCK_WAIT_TIMEOUT
    _, lock_wait, _ = session(engine)
    assert lock_wait != 1


def test_mariadb_statement_limit_applies_inside_the_transaction(
        one_connection: tuple[Engine, Tables]) -> None:
    engine, _ = one_connection
    with engine.connect() as conn, conn.begin():
        set_timeouts(conn, 1000, 200)
        with pytest.raises(OperationalError) as caught:
            conn.execute(select(text("SLEEP(5)")).where(text("1 = 1"))).all()
    assert caught.value.orig.args[0] == 1969  # ER_STATEMENT_TIMEOUT
    _, _, statement_time = session(engine)
    assert statement_time == 0


def test_postgres_ends_a_chunk_transaction_whose_client_went_silent(pg_url: str) -> None:
    """A worker cut off the network mid-chunk never sends COMMIT, nor closes its socket: the
    chunk's own idle_in_transaction_session_timeout makes PostgreSQL end and roll back the
    transaction (tests/reliability/test_partition.py shows it with a real partition)."""
    from workers.db import begin_chunk

    engine, watcher = make_engine(pg_url), make_engine(pg_url)
    try:
        conn = engine.connect()
        conn.begin()
        begin_chunk(conn, lock_timeout_ms=1000, statement_timeout_ms=300)
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        # The client now says nothing more, as a partitioned worker would.
        alive = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
        deadline = time.monotonic() + 30
        while True:
            with watcher.connect() as w:
                if w.execute(alive, {"pid": pid}).scalar_one() == 0:
                    break
            assert time.monotonic() < deadline, "the idle chunk transaction was never ended"
            time.sleep(0.1)
        with pytest.raises(DBAPIError, match="idle-in-transaction timeout"):
            conn.execute(text("SELECT 1"))
        conn.invalidate()
    finally:
        engine.dispose()
        watcher.dispose()


def test_mysql_branch_puts_the_session_lock_wait_back_at_checkin(
        one_connection: tuple[Engine, Tables], monkeypatch: pytest.MonkeyPatch) -> None:
    """MySQL proper has no SET STATEMENT: the chunk sets the session's lock wait and the pool
    puts it back at check-in. No MySQL server runs here; MariaDB accepts the same statements,
    so the MySQL branch runs against it with the dialect's MariaDB flag off."""
    engine, tables = one_connection
    before = session(engine)
    monkeypatch.setattr(engine.dialect, "is_mariadb", False)
    with engine.connect() as conn, conn.begin():
        set_timeouts(conn, 2000, 2500)
        during = int(conn.execute(text("SELECT @@SESSION.innodb_lock_wait_timeout"))
                     .scalar_one())
    monkeypatch.undo()
    assert during == 2
    assert session(engine) == before
