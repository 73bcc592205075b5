"""A worker SIGKILLed at random while a distributed, archived `db-clean` run moves chunks: no row
is lost (every row its own rule deleted is in its table's archive), none is archived twice (no
archive holds a primary key twice), and nothing eligible is left once the run has finished.

The killed worker may have been inside a chunk's transaction (rolled back by the database when
its connection died; the chunk is sent again when its heartbeat lapses), holding prefetched
chunk messages (sent again after the resend period), or between a commit and its count (the
copy sent again moves nothing). A replacement worker joins, as a supervisor would start one.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, Table, select

from tests.acceptance.test_db_clean_workers import (
    _log_rows,
    _registry,
    _send,
    archived,
    cleanup_keys,  # noqa: F401 - a fixture
    wait_for,
    worker_env,
)
from tests.airflow_schemas import airflow_schema_database
from tests.integration.test_db_clean import T, expected, keys, populate, snapshot
from tests.processes import start_worker
from workers.celery_app import DB_CLEAN, DB_CLEAN_PUMP
from workers.db import make_engine

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

LOG_ROWS = 3000
#: Tables whose rows only their own rule deletes (no cascade from a parent): each deleted row
#: must be in the archive.
OWN_RULE_ONLY = ("log", "job", "dag_run")


def _pks(engine: Engine, name: str) -> set[str]:
    with engine.connect() as conn:
        t = Table(name, MetaData(), autoload_with=conn)
        return {str(tuple(r)) for r in conn.execute(select(*t.primary_key.columns))}


@pytest.mark.parametrize(("dialect", "version"), [("postgresql", "3.3.2"), ("mysql", "3.4.0b2")],
                         ids=["postgresql", "mariadb"])
def test_a_worker_killed_at_random_loses_no_row_and_archives_none_twice(
        dialect: str, version: str, isolation: dict[str, str], redis_url: str,
        tmp_path: Path, cleanup_keys: None) -> None:  # noqa: F811 - the fixture
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"seed {seed}")
    with airflow_schema_database(dialect, version) as url:
        engine = make_engine(url)
        try:
            data = populate(engine, version)
            _log_rows(engine, LOG_ROWS)
            before = {name: _pks(engine, name) for name in OWN_RULE_ONLY}
            # Short limits, so a chunk message the dead worker had prefetched is sent again
            # within a minute (resend period = chunk time limit + 30 s).
            env = worker_env(url, isolation, redis_url, max_chunks_in_flight="6",
                             chunk_time_limit="10", chunk_soft_time_limit="8",
                             visibility_timeout="20", lock_ttl_seconds="15",
                             statement_timeout_ms="5000", lock_timeout_ms="2000")
            registry = _registry(env)
            run_id = "dbclean-crash-1"
            started = [start_worker(env, tmp_path, f"w{i}", concurrency=2) for i in (1, 2)]
            try:
                _send(env, DB_CLEAN, clean_before_timestamp=T.isoformat(), batch_size=20,
                      run_id=run_id)
                k = rng.randint(1, 40)
                at_kill = wait_for(f"{k} chunks moved", lambda: (r := registry.get(run_id))
                                   and (r.chunks_done >= k or r.ended) and r)
                assert not at_kill.ended, "the run ended before the kill"
                victim = rng.choice(started)
                victim.kill()
                print(f"killed {victim.name} after {at_kill.chunks_done} chunks")
                started.append(start_worker(env, tmp_path, "w3", concurrency=2))
                last_pump = 0.0

                def ended() -> Any:
                    nonlocal last_pump
                    if time.monotonic() - last_pump > 1:  # as beat and a waiting CLI do
                        _send(env, DB_CLEAN_PUMP, run_id=run_id)
                        last_pump = time.monotonic()
                    r = registry.get(run_id)
                    return r if r is not None and r.ended else None

                record = wait_for("the run to end", ended, timeout=420)
            finally:
                for w in started:
                    w.stop()
            assert record.state == "finished", record.error
            assert record.chunks_done > at_kill.chunks_done
            arch = archived(engine)
            for name, rows in arch.items():  # nothing archived twice
                twice = [k for k, n in Counter(rows).items() if n > 1]
                assert not twice, f"{name}: archived twice: {twice[:5]}"
            for name in OWN_RULE_ONLY:  # nothing lost: deleted = archived
                left = _pks(engine, name)
                assert set(arch.get(name, [])) == before[name] - left, name
                assert not set(arch.get(name, [])) & left, name
            # Nothing eligible left: what Airflow's rules leave, and no old log row.
            want = expected(data)
            got = snapshot(engine)
            assert {k: got[k] for k in want if k != "log"} == \
                {k: v for k, v in want.items() if k != "log"}
            assert keys(engine, "log") == want["log"]
        finally:
            engine.dispose()
