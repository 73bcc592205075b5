"""MariaDB replica lag on a real private primary + replica (tests/mariadb_replica.py): 0 when
idle, rising while the replica's apply is blocked and the primary writes, back to 0 once it is
released; stopped replication reads as infinitely behind; the primary and an unprivileged user
are refused with what to change; and the pair is gone after a failing block."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, text

from tests.mariadb_replica import ReplicaPair, mariadb_replica_pair
from tests.services import reachable
from workers.flow.lag import ReplicaLagUnreadable, mysql_replica_lag_seconds

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LIMIT = 1.0
WAIT = 60.0


def wait_for(what: str, check: Callable[[], bool], *, tick: Callable[[], None] | None = None,
             timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        if tick is not None:
            tick()
        time.sleep(0.2)


def lag(engine: Engine) -> float:
    with engine.connect() as conn:
        return mysql_replica_lag_seconds(conn)


@pytest.fixture
def replica(mariadb_replica: ReplicaPair) -> Iterator[Engine]:
    """An engine on the replica, once a table written on the primary has reached it."""
    mariadb_replica.on(mariadb_replica.primary, "CREATE DATABASE sw",
                       "CREATE TABLE sw.filler (id INT AUTO_INCREMENT PRIMARY KEY, pad TEXT)")
    engine = mariadb_replica.replica.engine()
    wait_for("schema replicated", lambda: _has_table(engine))
    yield engine
    engine.dispose()


def _has_table(engine: Engine) -> bool:
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = 'sw' AND table_name = 'filler'")).scalar_one() == 1


def test_lag_rises_while_apply_is_blocked_and_falls_after(mariadb_replica: ReplicaPair,
                                                          replica: Engine) -> None:
    assert lag(replica) < LIMIT

    def write() -> None:
        mariadb_replica.on(mariadb_replica.primary,
                           "INSERT INTO sw.filler (pad) VALUES (repeat('x', 100))")

    with mariadb_replica.apply_blocked("sw", "filler"):
        wait_for("lag over the limit while apply is blocked",
                 lambda: lag(replica) > LIMIT, tick=write)
    wait_for("lag back under the limit once apply runs", lambda: lag(replica) < LIMIT)


def test_stopped_replication_is_over_any_limit(mariadb_replica: ReplicaPair,
                                               replica: Engine) -> None:
    mariadb_replica.stop_applying()
    assert math.isinf(lag(replica))
    mariadb_replica.start_applying()
    wait_for("lag readable again after restart", lambda: lag(replica) < LIMIT)


def test_the_primary_is_refused_as_a_replica(mariadb_replica: ReplicaPair) -> None:
    engine = mariadb_replica.primary.engine()
    try:
        with engine.connect() as conn, pytest.raises(ReplicaLagUnreadable, match="not a replica"):
            mysql_replica_lag_seconds(conn)
    finally:
        engine.dispose()


def test_a_user_without_the_privilege_is_told_the_grant(mariadb_replica: ReplicaPair) -> None:
    mariadb_replica.on(mariadb_replica.replica, "CREATE USER reader@'%'")
    engine = mariadb_replica.replica.engine(user="reader", database="information_schema")
    try:
        with engine.connect() as conn, pytest.raises(ReplicaLagUnreadable, match="REPLICA MONITOR"):
            mysql_replica_lag_seconds(conn)
        mariadb_replica.on(mariadb_replica.replica, "GRANT REPLICA MONITOR ON *.* TO reader@'%'")
        engine.dispose()  # a global privilege applies from the next connection on
        with engine.connect() as conn:
            assert mysql_replica_lag_seconds(conn) < math.inf
    finally:
        engine.dispose()


def test_the_pair_is_killed_and_removed_when_the_block_fails() -> None:
    seen: list[ReplicaPair] = []
    with pytest.raises(ZeroDivisionError), mariadb_replica_pair() as pair:
        seen.append(pair)
        assert pair.replica_status()["Slave_SQL_Running"] == "Yes"
        1 / 0  # noqa: B018 - the failing test body
    [pair] = seen
    assert not pair.root.exists()
    assert not reachable("127.0.0.1", pair.primary.port)
    assert not reachable("127.0.0.1", pair.replica.port)
