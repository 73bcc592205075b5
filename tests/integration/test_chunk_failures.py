"""A chunk task's failure is logged as what its run counted (issue 22, item 8). On a broker
outage the hard time limit ended chunks whose DELETE had committed and been counted while they
sent the next chunks to the dead broker: `chunk_failed TimeLimitExceeded` at ERROR while the
run's chunks_failed stayed 0. The run store decides; the log follows it. Real Redis (and
memory://, the same Lua)."""

from __future__ import annotations

from structlog.testing import capture_logs

from tests.cleanup_runs import id_plan, start_plan
from workers.chunk_failures import record_chunk_failure
from workers.runs import Gate, RunStore

ERROR = "chunk {n} failed: TimeLimitExceeded: TimeLimitExceeded(30,)"


def fail(store: RunStore, run_id: str, number: int) -> list[dict[str, object]]:
    with capture_logs() as logs:
        record_chunk_failure(store, run_id, number, "ids", ERROR.format(n=number),
                             lock_ttl=3600, window=16, gate=Gate(), table="task_state")
    return logs


def test_a_chunk_cut_short_after_it_was_counted_is_no_failed_chunk(store: RunStore) -> None:
    run_id = "r-counted"
    first = start_plan(store, run_id, id_plan(3)).chunks[0][0]
    counted, _ = store.finish_chunk(run_id, first, "ids", 10, 10, lock_ttl=3600, window=16,
                                    resend_after=3600, gate=Gate(), table="task_state")
    assert counted

    logs = fail(store, run_id, first)  # the hard time limit, while it sent the next chunks

    record = store.get(run_id)
    assert record is not None and record.chunks_failed == 0 and record.rows_deleted == 10
    assert [e for e in logs if e["log_level"] == "error"] == []
    [warning] = logs
    assert warning["event"] == "chunk_interrupted_after_counted"
    assert "counted already" in str(warning["note"])


def test_a_chunk_that_failed_is_counted_and_logged_as_failed(store: RunStore) -> None:
    run_id = "r-failed"
    number = start_plan(store, run_id, id_plan(3)).chunks[1][0]

    logs = fail(store, run_id, number)

    record = store.get(run_id)
    assert record is not None and record.chunks_failed == 1
    assert [(e["event"], e["log_level"]) for e in logs] == [("chunk_failed", "error")]
    assert logs[0]["error"] == ERROR.format(n=number)
    # The same failure delivered again is counted once, and not logged as a second failure.
    again = fail(store, run_id, number)
    assert store.get(run_id).chunks_failed == 1  # type: ignore[union-attr]
    assert [e["log_level"] for e in again] == ["warning"]
