"""Every key a run creates has a TTL from the moment it exists, on Redis and memory:// (the
integration conftest's store): the run's record, its window (made by the first chunk cut into
it, after the record's EXPIRE), whatever planner cut it, so an ended run leaves nothing behind
once its retention passes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import create_schema, database_now
from workers.chunk import run_local
from workers.coordinator import coordinate
from workers.runs import RUN_RETENTION_SECONDS, RunStore
from workers.seed import SeedSpec, seed
from workers.settings import Settings

pytestmark = pytest.mark.integration


def run_keys(store: RunStore, run_id: str) -> dict[str, int]:
    """Each key of *run_id* and its TTL in seconds (-1: none)."""
    return {k: int(store.client.ttl(k))
            for k in store.client.scan_iter(match=f"{store.prefix}:*{run_id}*")}


@pytest.mark.parametrize("planner", ["blocks", "walk", "expiry"])
def test_a_runs_keys_all_expire_while_it_runs_and_after_it_ends(
        pg_url: str, store: RunStore, planner: str,
        make_settings: Callable[..., Settings]) -> None:
    engine, tables = create_schema(pg_url)
    seed(engine, tables, SeedSpec(rows=2000), database_now(engine))
    settings = make_settings(database_url=pg_url, planner=planner, cleanup_batch_size=100,
                             max_chunks_in_flight=3)
    sent: list[object] = []
    summary = coordinate(settings, engine, tables, store,
                         lambda *chunk: sent.append(chunk), source="test")
    assert summary.status == "started" and sent
    live = run_keys(store, summary.run_id)
    assert {k.rsplit(":", 1)[-1] for k in live} >= {"inflight"}
    assert all(0 < ttl <= RUN_RETENTION_SECONDS for ttl in live.values()), live
    # A whole run in this process, to its end.
    store.abort(summary.run_id, "test: make way for a whole run")
    whole = run_local(settings, engine, tables, store)
    record = store.get(whole.run_id)
    assert record is not None and record.state == "finished"
    ended = run_keys(store, whole.run_id)
    assert ended and all(0 < ttl <= RUN_RETENTION_SECONDS for ttl in ended.values()), ended
    engine.dispose()
