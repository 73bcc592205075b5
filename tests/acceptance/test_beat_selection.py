"""Beat's selection, end to end: ``celery -A workers beat`` and a worker as subprocesses on a
fresh PostgreSQL database and the test Redis, with STATESWEEP_DAG_IDS and STATESWEEP_CLEAN_GRACE
set (STATESWEEP_EXCLUDE_DAG_IDS takes the same path: tests/unit/test_beat_selection.py). Every
run beat triggers carries the selection, its cutoff is the grace before the database's now(),
and exactly the rows of the selected dags that expired before that cutoff are gone."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from sqlalchemy import select

from tests.acceptance.test_pipeline import Pipeline, beat, wait_until
from tests.conftest import database_now
from tests.processes import workers
from workers.runs import RunRecord
from workers.selection import Selection

pytestmark = pytest.mark.acceptance

# The seed's expired rows of dag_k expired 100 * (k % 10) + 1 to 100 * (k % 10 + 1) minutes
# ago: with a grace of 4 hours dag_2 straddles the cutoff and dag_3's are all past it.
GRACE = dt.timedelta(hours=4)
CLEANED = {"dag_2", "dag_3"}


def test_a_beat_run_cleans_only_the_selected_dags_past_the_grace(
        make_pipeline: Callable[..., Pipeline]) -> None:
    p = make_pipeline(rows=20_000, batch=2_000, coordinator_schedule="1",
                      orphan_schedule="3600", dag_ids="dag_2,dag_3", clean_grace="4h")
    t = p.tables.task_state
    with p.engine.connect() as conn:
        before = {row.id: (row.dag_id, row.expires_at) for row in
                  conn.execute(select(t.c.id, t.c.dag_id, t.c.expires_at))}
    seeded_at = database_now(p.engine)

    with workers(p.env, p.log_dir, count=1, concurrency=2):
        with beat(p.env, p.log_dir):
            def a_beat_run_finished() -> list[RunRecord]:
                return [r for r in p.registry.recent(50) if r.state == "finished"]

            wait_until(a_beat_run_finished, 45, "a beat-triggered run")
        wait_until(lambda: p.queued(p.settings.control_queue) == 0
                   and p.registry.active_run() is None, 30, "the last beat trigger")

    runs = sorted(p.registry.recent(50), key=lambda r: r.started_at)
    assert runs and all((r.source, r.state) == ("beat", "finished") for r in runs), runs
    for run in runs:
        assert Selection.decode(run.selection) == Selection(("dag_2", "dag_3"), (), None, GRACE)
    cutoffs = [dt.datetime.fromisoformat(r.cutoff) for r in runs]
    # Each run's cutoff is the grace before the database's now() as it planned: after the
    # seed, before now, never later.
    assert all(seeded_at - GRACE <= c <= database_now(p.engine) - GRACE for c in cutoffs)
    last = max(cutoffs)  # every run deletes what an earlier one did, and maybe more

    def deleted_by_selection(dag_id: str, expires_at: dt.datetime | None) -> bool:
        return dag_id in CLEANED and expires_at is not None and expires_at < last

    with p.engine.connect() as conn:
        left = set(conn.execute(select(t.c.id)).scalars())
    gone = set(before) - left
    assert gone == {i for i, (d, e) in before.items() if deleted_by_selection(d, e)}
    assert sum(r.rows_deleted for r in runs) == len(gone) > 0
    now = database_now(p.engine)
    expired_left = {before[i] for i in left if before[i][1] is not None and before[i][1] < now}
    # What the selection keeps is really there: expired state of the other dags, and state of
    # the cleaned dags that expired within the grace.
    assert any(d not in CLEANED for d, _ in expired_left)
    assert any(d in CLEANED and e is not None and e >= last for d, e in expired_left)
