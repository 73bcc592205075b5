"""SeedSpec's period: the server-side seed (PostgreSQL) and the row-by-row one (SQLite, MariaDB)
make exactly the rows kind_of says, for every mix the benchmark uses."""

from __future__ import annotations

import pytest
from sqlalchemy import delete

from bench.names import EXPIRED_MIXES, seed_spec
from tests.conftest import create_schema, database_now
from workers.seed import expected_survivors, seed, task_state_rows

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("percent", [1, 90])
def test_seeded_mix_matches_kind_of(db_url: str, percent: int) -> None:
    assert percent in EXPIRED_MIXES
    engine, tables = create_schema(db_url)
    try:
        spec = seed_spec(1000, percent)
        now = database_now(engine)
        counts = seed(engine, tables, spec, now)
        assert counts.expired == 1000 * percent // 100
        t = tables.task_state
        with engine.begin() as conn:
            gone = conn.execute(delete(t).where(t.c.expires_at < now)).rowcount
        assert gone == counts.expired
        assert task_state_rows(engine, tables) == expected_survivors(spec)
    finally:
        engine.dispose()
