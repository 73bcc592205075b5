"""The exporter's backlog queries on a real PostgreSQL: exact and estimated counts, the age of
the oldest expired row, orphans, and the statement bound that keeps a scrape from waiting."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from tests.conftest import create_schema, database_now
from workers.db import make_engine
from workers.exporter import read_backlog
from workers.seed import SeedSpec, seed

pytestmark = pytest.mark.integration


def test_backlog_counts_exactly_estimates_closely_and_reads_zero_when_clean(
        pg_url: str) -> None:
    engine, tables = create_schema(pg_url)
    counts = seed(engine, tables, SeedSpec(rows=20_000), database_now(engine))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE task_state"))
    exact = read_backlog(engine, "auto", 5000, "exact")
    assert (exact.task_table, exact.expired_rows, exact.asset_table, exact.orphaned_rows) == (
        "task_state", counts.expired, "asset_state", counts.asset_rows_orphaned)
    assert exact.oldest_expired_age_seconds > 0
    estimate = read_backlog(engine, "auto", 5000, "estimate")
    assert estimate.expired_rows == pytest.approx(counts.expired, rel=0.1)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM task_state WHERE expires_at < now()"))
    # Statistics still describe the old table, but min() finds nothing: both modes say 0.
    for mode in ("exact", "estimate"):
        clean = read_backlog(engine, "auto", 5000, mode)
        assert (clean.expired_rows, clean.oldest_expired_age_seconds) == (0, 0.0)
    engine.dispose()


def test_a_blocked_backlog_query_gives_up_within_its_timeout(pg_url: str) -> None:
    engine, tables = create_schema(pg_url)
    seed(engine, tables, SeedSpec(rows=100), database_now(engine))
    blocker = make_engine(pg_url)
    with blocker.begin() as conn:  # e.g. a migration holding the table
        conn.execute(text("LOCK TABLE task_state IN ACCESS EXCLUSIVE MODE"))
        with pytest.raises(Exception, match="lock timeout|canceling statement"):
            read_backlog(engine, "seed", 200, "exact")
    blocker.dispose()
    engine.dispose()
