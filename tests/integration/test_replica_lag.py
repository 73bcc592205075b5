"""Replica lag on a real streaming standby (tests/standby.py): none when idle, rising while
the standby's replay is paused and the primary writes, falling after resume; refusals on the
standby itself and for a role without pg_monitor; and the project's schema and a real local
cleanup on the primary, replayed to the standby."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, create_engine, text

from tests.conftest import database_now
from tests.standby import StandbyPair
from workers.chunk import run_local
from workers.db import make_engine
from workers.flow.lag import (
    ReplicaLagUnreadable,
    StandbyLag,
    replica_lag_seconds,
    standby_lags,
)
from workers.runs import registry_for
from workers.schema import build_tables, upgrade
from workers.seed import SeedSpec, expected_survivors, seed, task_state_rows
from workers.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LIMIT = 1.0  # seconds: the lag limit these tests hold the standby against
WAIT = 60.0  # bound of every poll; generous, since the machine is shared


def wait_for(what: str, check: Callable[[], bool], *, tick: Callable[[], None] | None = None,
             timeout: float = WAIT) -> None:
    """Poll *check* (running *tick* between polls) until true; fail naming *what*."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        if tick is not None:
            tick()
        time.sleep(0.2)


@pytest.fixture
def primary(standby: StandbyPair) -> Iterator[Engine]:
    engine = standby.primary_engine()
    yield engine
    engine.dispose()


def lag(engine: Engine) -> float | None:
    with engine.connect() as conn:
        return replica_lag_seconds(conn)


def lags(engine: Engine) -> list[StandbyLag]:
    with engine.connect() as conn:
        return standby_lags(conn)


def test_an_idle_streaming_standby_has_no_lag(primary: Engine) -> None:
    wait_for("idle standby caught up", lambda: (lag(primary) or 0) < LIMIT)
    [only] = lags(primary)
    assert only.state == "streaming"
    assert only.seconds < LIMIT


def test_lag_rises_while_replay_is_paused_and_falls_after_resume(
        standby: StandbyPair, primary: Engine) -> None:
    with primary.connect() as conn:
        conn.execute(text("CREATE TABLE filler (id serial PRIMARY KEY, pad text)"))

    def write() -> None:
        with primary.connect() as conn:
            conn.execute(text("INSERT INTO filler (pad) SELECT repeat('x', 100) "
                              "FROM generate_series(1, 200)"))

    wait_for("standby caught up before the pause", lambda: (lag(primary) or 0) < LIMIT)
    standby.pause_replay()
    assert standby.replay_paused()
    wait_for("lag over the limit while replay is paused",
             lambda: (lag(primary) or 0) > LIMIT, tick=write)
    [paused] = lags(primary)
    assert paused.behind_bytes is not None and paused.behind_bytes > 0
    # Still above once writes stop: a stuck replay must not read as caught up.
    assert (lag(primary) or 0) > LIMIT

    standby.resume_replay()
    wait_for("lag back under the limit after resume", lambda: (lag(primary) or 0) < LIMIT)
    standby.wait_replayed()
    replica = standby.standby_engine()
    try:
        with replica.connect() as conn:
            replayed = conn.execute(text("SELECT count(*) FROM filler")).scalar_one()
    finally:
        replica.dispose()
    with primary.connect() as conn:
        assert replayed == conn.execute(text("SELECT count(*) FROM filler")).scalar_one()


def test_a_standby_that_falls_silent_reads_ever_older(standby: StandbyPair,
                                                     primary: Engine) -> None:
    def lag_cleared() -> bool:
        # Idle and caught up: the standby has replied with a replay position at the primary's
        # WAL end, and PostgreSQL has set replay_lag to NULL. A freshly started standby also
        # shows a NULL replay_lag before its first reply, with no replay_lsn: not this state.
        with primary.connect() as conn:
            return conn.execute(text(
                "SELECT replay_lag IS NULL AND replay_lsn IS NOT NULL"
                "       AND replay_lsn >= pg_current_wal_lsn()"
                " FROM pg_stat_replication")).scalar() is True

    receiver = standby.walreceiver_pid()
    for _ in range(10):
        wait_for("replay_lag cleared on the idle primary", lag_cleared)
        os.kill(receiver, signal.SIGSTOP)
        # Background WAL (a checkpoint, autovacuum on a busy machine) can land between the two
        # steps and leave a frozen replay_lag behind: the documented case where a silent standby
        # keeps its last figure. Start again until the silence begins from a cleared lag.
        if lag_cleared():
            break
        os.kill(receiver, signal.SIGCONT)
    else:
        pytest.fail("replay_lag never stayed cleared long enough to silence the standby")
    try:
        with primary.connect() as conn:
            conn.execute(text("CREATE TABLE written_while_silent (id int)"))
        wait_for("a silent standby's lag over the limit", lambda: (lag(primary) or 0) > LIMIT)
        [silent] = lags(primary)
        assert silent.source == "last_reply"
        assert silent.behind_bytes is not None and silent.behind_bytes > 0
    finally:
        os.kill(receiver, signal.SIGCONT)
    wait_for("lag back under the limit once it replies", lambda: (lag(primary) or 0) < LIMIT)


def test_a_write_after_an_idle_spell_is_not_read_as_lag(standby: StandbyPair,
                                                        primary: Engine) -> None:
    # Right after a commit on a quiet primary the standby has not replied yet, and the only
    # figure is its last reply's age (3 s here, by construction); replica_lag_seconds re-reads
    # until the standby's reply gives a real one.
    def lag_cleared() -> bool:
        with primary.connect() as conn:
            return conn.execute(text(
                "SELECT replay_lag IS NULL FROM pg_stat_replication")).scalar() is True

    for n in range(3):
        standby.configure_standby("wal_receiver_status_interval", "1s")
        wait_for("replay_lag cleared on the idle primary", lag_cleared)
        standby.configure_standby("wal_receiver_status_interval", "60s")
        time.sleep(3)  # no status reply for 3 s: the last reply ages
        with primary.connect() as conn:
            conn.execute(text(f"CREATE TABLE after_idle_{n} (id int)"))
            reading = replica_lag_seconds(conn, settle_seconds=30)
        assert reading is not None and reading < LIMIT


def test_no_standby_reads_none(standby: StandbyPair, primary: Engine) -> None:
    assert lag(primary) is not None
    standby.stop_standby()
    wait_for("walsender gone after the standby stopped", lambda: lag(primary) is None)


def test_reading_lag_on_the_standby_is_refused(standby: StandbyPair) -> None:
    engine = standby.standby_engine()
    try:
        with engine.connect() as conn, pytest.raises(ReplicaLagUnreadable, match="primary"):
            replica_lag_seconds(conn)
    finally:
        engine.dispose()


def test_a_role_without_pg_monitor_is_told_the_grant(standby: StandbyPair,
                                                      primary: Engine) -> None:
    with primary.connect() as conn:
        conn.execute(text("CREATE ROLE lag_reader LOGIN"))
    reader_url = standby.primary_url().replace("postgres@", "lag_reader@")
    reader = engine_for(reader_url)
    try:
        with reader.connect() as conn, pytest.raises(
                ReplicaLagUnreadable, match='GRANT pg_monitor TO "lag_reader"'):
            replica_lag_seconds(conn)
        with primary.connect() as conn:
            conn.execute(text("GRANT pg_monitor TO lag_reader"))
        with reader.connect() as conn:
            assert replica_lag_seconds(conn) is not None
    finally:
        reader.dispose()


def engine_for(url: str) -> Engine:
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://"),
                         isolation_level="AUTOCOMMIT")


def test_the_primary_takes_the_schema_and_a_local_cleanup_replays_to_the_standby(
        standby: StandbyPair, make_settings: Callable[..., Settings]) -> None:
    url = standby.create_database("statesweep")
    engine = make_engine(url)
    replica = make_engine(standby.standby_url("statesweep"))
    try:
        upgrade(engine, "seed")
        tables = build_tables("seed")
        spec = SeedSpec(rows=2000, assets=10, keys_per_asset=2)
        counts = seed(engine, tables, spec, database_now(engine))
        settings = make_settings(database_url=url, run_store_url="memory://")
        summary = run_local(settings, engine, tables, registry_for("memory://", "lag-test"),
                            batch_size=300)
        assert summary.expected_rows == counts.expired
        assert task_state_rows(engine, tables) == expected_survivors(spec)
        standby.wait_replayed()
        assert task_state_rows(replica, tables) == expected_survivors(spec)
    finally:
        engine.dispose()
        replica.dispose()
