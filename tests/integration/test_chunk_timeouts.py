"""A chunk's lock-wait and statement bounds last for its own transaction only (MariaDB).

The connection pool hands the same connection to planning, the run store's database reads and
the next chunk; none of them may inherit a chunk's one-second lock wait or its statement limit.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import OperationalError

from tests.conftest import database_now
from tests.reliability.faults import hold_row_lock
from workers.cleanup import delete_chunk, sweep_orphaned_asset_state
from workers.db import make_engine, set_timeouts
from workers.schema import Tables, build_tables, upgrade
from workers.seed import SeedSpec, kind_of, seed

pytestmark = pytest.mark.integration

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
    deleted = delete_chunk(engine, tables, 1, SPEC.rows, database_now(engine),
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
                delete_chunk(engine, tables, 1, SPEC.rows, database_now(engine),
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
