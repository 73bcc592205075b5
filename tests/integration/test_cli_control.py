"""Operator controls and what `status`, `doctor` and `cleanup --wait` say about runs that are
not going to plan, on real PostgreSQL and Redis, with no worker: runs are planned in-process by
coordinator.coordinate() with a dispatch that keeps the chunk messages (as a dead worker would
have taken them), and the CLI is driven with click's CliRunner or as the console script."""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import text

from tests.cleanup_runs import Outbox, deliver
from tests.integration.test_cli import (  # noqa: F401 - restore_logging: autouse fixture
    ROWS,
    STATESWEEP,
    Seeded,
    closed_port,
    restore_logging,
)
from tests.processes import child_env
from tests.services import REDIS_URL
from workers import chunk, coordinator
from workers.cli import EXIT_ABORTED, EXIT_BAD_ARGUMENT, EXIT_OK, EXIT_REFUSED, EXIT_STUCK
from workers.cli.progress import ProgressBar, RunStuck, follow_run
from workers.runs import RunStore, registry_for
from workers.settings import Settings
from workers.window import resend_after

pytestmark = pytest.mark.integration


@pytest.fixture
def store(seeded: Seeded) -> Iterator[RunStore]:
    yield registry_for(REDIS_URL, seeded.env["STATESWEEP_KEY_PREFIX"])


def settings_of(seeded: Seeded, **extra: str) -> Settings:
    return Settings.from_env({**seeded.env, **extra})


def plan_run(seeded: Seeded, store: RunStore, batch: int = 2000) -> tuple[str, Outbox]:
    """A run planned and its first window sent into an outbox nobody delivers."""
    outbox = Outbox()
    summary = coordinator.coordinate(settings_of(seeded), seeded.engine, seeded.tables, store,
                                     outbox, batch_size=batch, source="test")
    assert summary.status == "started" and outbox.sent, summary
    return summary.run_id, outbox


def age_run(store: RunStore, run_id: str, seconds: float) -> None:
    """Move the run's clock back as if its worker died *seconds* ago: the window opened and the
    chunks were sent then, and nothing has finished since."""
    key = f"{store.prefix}:run:{run_id}"
    then = time.time() - seconds
    store.client.hset(key, mapping={"window_started_at": then, "last_progress_at": then,
                                    "planned_at": then})
    inflight = f"{key}:inflight"
    for number, value in store.client.hgetall(inflight).items():
        rng, _sent, st = value.split("|")
        store.client.hset(inflight, number, f"{rng}|{then}|{st}")


def as_json(result: Any) -> Any:
    assert result.exit_code == EXIT_OK, result.stderr
    return json.loads(result.stdout)


# --- pause, resume ------------------------------------------------------------------------------


def test_pause_for_a_while_is_shown_by_status_and_doctor_and_resume_sends_a_pump(
        seeded: Seeded, store: RunStore) -> None:
    run_id, _ = plan_run(seeded, store)  # a run active: resume pumps it through the broker
    paused = seeded.invoke("pause", "--for", "10m", "--reason", "incident 42")
    assert paused.exit_code == EXIT_OK, paused.stderr
    assert paused.stdout.startswith("paused until ") and "incident 42" in paused.stdout
    now = store.paused()
    assert now is not None and now.reason == "incident 42" and "(cli)" in now.by
    assert 590 < now.until - now.at <= 600
    assert 0 < store.client.pttl(f"{store.prefix}:pause") <= 600_000  # ends by itself

    overview = seeded.invoke("status")
    assert "PAUSED by " in overview.stdout and "incident 42" in overview.stdout
    doctor = json.loads(seeded.invoke("doctor", "--format", "json").stdout)  # no worker: 7
    pause_check = next(c for c in doctor["checks"] if c["name"] == "pause")
    assert pause_check["status"] == "warn" and "incident 42" in pause_check["detail"]

    broker = redis.Redis.from_url(REDIS_URL)
    queue = seeded.env["STATESWEEP_CONTROL_QUEUE"]
    try:
        resumed = seeded.invoke("resume", "--format", "json")
        data = as_json(resumed)
        assert data["resumed"] and data["was"]["reason"] == "incident 42"
        assert data["active_run_id"] == run_id and data["pump_sent"] is True
        assert store.paused() is None
        message = json.loads(broker.lpop(queue) or b"{}")
        assert message["headers"]["task"] == "statesweep.pump"
    finally:
        broker.delete(queue)
        broker.close()


def test_resume_without_a_broker_says_the_next_beat_pump_sends_the_chunks(
        seeded: Seeded, store: RunStore) -> None:
    plan_run(seeded, store)
    store.pause("test", "", None)
    result = seeded.invoke("resume", STATESWEEP_BROKER_URL=f"redis://127.0.0.1:{closed_port()}/0")
    assert result.exit_code == EXIT_OK, result.stderr
    assert "the next beat pump" in result.stderr and store.paused() is None


@pytest.mark.parametrize(("args", "named"), [
    (("pause", "--for", "0"), "--for: '0' is not a positive duration"),
    (("pause", "--for", "banana"), "--for: 'banana' is not a duration"),
    (("pause", "--for", "1.5h"), "--for: '1.5h' is not a duration"),
])
def test_a_bad_pause_duration_is_named_and_nothing_is_paused(
        seeded: Seeded, store: RunStore, args: tuple[str, ...], named: str) -> None:
    result = seeded.invoke(*args)
    assert result.exit_code == EXIT_BAD_ARGUMENT
    assert result.stderr.strip().splitlines() == [f"error: {named} (e.g. 90s, 15m, 2h, 1h30m, "
                                                  "1d or plain seconds)"]
    assert result.stdout == "" and store.paused() is None


def test_resume_when_not_paused_is_refused(seeded: Seeded, store: RunStore) -> None:
    result = seeded.invoke("resume")
    assert result.exit_code == EXIT_REFUSED
    assert result.stderr.strip() == "error: cleanup is not paused; nothing to resume"
    assert result.stdout == ""


# --- abort --------------------------------------------------------------------------------------


def test_abort_frees_the_lock_its_chunks_delete_nothing_and_the_next_trigger_starts(
        seeded: Seeded, store: RunStore) -> None:
    run_id, outbox = plan_run(seeded, store)
    assert store.active_run() == run_id
    before = seeded.task_rows()

    result = seeded.invoke("abort", run_id, "--format", "json")
    data = as_json(result)
    assert data["state"] == "aborted" and "aborted by " in data["error"]
    assert store.active_run() is None
    # The aborted run's chunk messages still arrive; they delete nothing.
    settings = settings_of(seeded)
    for m in outbox.take():
        done = chunk.run_chunk(settings, seeded.engine, seeded.tables, store, Outbox(), m.args())
        assert done.rows == 0
    assert seeded.task_rows() == before

    summary = coordinator.coordinate(settings, seeded.engine, seeded.tables, store, Outbox(),
                                     source="test")
    assert summary.status == "started" and summary.run_id != run_id
    assert store.active_run() == summary.run_id


def test_abort_of_an_unknown_or_ended_run_is_refused_and_changes_nothing(
        seeded: Seeded, store: RunStore) -> None:
    unknown = seeded.invoke("abort", "no-such-run")
    assert unknown.exit_code == EXIT_BAD_ARGUMENT
    assert "unknown run id 'no-such-run'" in unknown.stderr and unknown.stdout == ""
    malformed = seeded.invoke("abort", "a:b")
    assert malformed.exit_code == EXIT_BAD_ARGUMENT and "run_id must be" in malformed.stderr

    run_id, _ = plan_run(seeded, store)
    assert seeded.invoke("abort", run_id).exit_code == EXIT_OK
    ended = store.get(run_id)
    again = seeded.invoke("abort", run_id)
    assert again.exit_code == EXIT_REFUSED
    assert f"run {run_id} has already ended (aborted); nothing to abort" in again.stderr
    assert store.get(run_id) == ended


# --- status: stalled, held, queued -----------------------------------------------------------


def test_status_reports_a_run_whose_worker_died_as_stalled_with_its_outstanding_chunks(
        seeded: Seeded, store: RunStore) -> None:
    run_id, outbox = plan_run(seeded, store)
    age_run(store, run_id, 300)

    data = as_json(seeded.invoke("status", run_id, "--format", "json"))
    now = data["condition"]
    assert now["stalled"] is True and now["idle_seconds"] >= 300
    sent = {(m.number, m.range.lo, m.range.hi) for m in outbox.sent}
    assert {(o["chunk"], o["lo"], o["hi"]) for o in now["outstanding"]} == sent
    again = resend_after(settings_of(seeded))
    for o in now["outstanding"]:
        assert o["state"] == "sent" and o["age_seconds"] >= 300
        from datetime import datetime
        gap = (datetime.fromisoformat(o["resend_at"])
               - datetime.fromisoformat(o["sent_at"])).total_seconds()
        assert gap == pytest.approx(again)

    detail = seeded.invoke("status", run_id)
    assert "STALLED: no chunk finished for" in detail.stdout
    assert f"outstanding   {len(sent)} chunks in flight" in detail.stdout
    assert "due: the next pump or trigger re-sends it" in detail.stdout  # sent 300s ago
    assert "no chunk finished yet (the first sent " in detail.stdout
    overview = seeded.invoke("status")
    assert f"active run: {run_id}" in overview.stdout and "STALLED" in overview.stdout
    assert "planner " in overview.stdout


def test_a_moving_run_is_not_stalled_and_a_held_one_says_why(seeded: Seeded,
                                                               store: RunStore) -> None:
    run_id, outbox = plan_run(seeded, store)
    now = as_json(seeded.invoke("status", run_id, "--format", "json"))["condition"]
    assert now["stalled"] is False and now["outstanding"]

    store.pause("ops", "incident", None)
    m = outbox.take()[0]
    parked = chunk.run_chunk(settings_of(seeded), seeded.engine, seeded.tables, store, Outbox(),
                             m.args())
    assert parked.rows == 0
    age_run(store, run_id, 300)  # held for long: still not a stall
    data = as_json(seeded.invoke("status", run_id, "--format", "json"))
    assert data["condition"]["held"] == "paused" and data["condition"]["stalled"] is False
    assert data["condition"]["held_since"]
    assert any(o["chunk"] == m.number and o["state"] == "parked"
               for o in data["condition"]["outstanding"])
    overview = seeded.invoke("status")
    assert "held: paused since" in overview.stdout


def test_status_follow_without_an_id_follows_the_active_run(seeded: Seeded,
                                                            store: RunStore) -> None:
    nothing = seeded.invoke("status", "--follow")
    assert nothing.exit_code == EXIT_BAD_ARGUMENT and "no run is active" in nothing.stderr

    run_id, outbox = plan_run(seeded, store)
    proc = subprocess.Popen([STATESWEEP, "status", "--follow", "--format", "json"],
                            env=child_env(seeded.env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # it has found the active run: now finish that run
        assert first.strip() == f"following the active run {run_id}"
        deliver(settings_of(seeded), seeded.engine, seeded.tables, store, outbox)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_OK, err
    data = json.loads(out)
    assert data["run_id"] == run_id and data["state"] == "finished"
    assert data["rows_deleted"] == seeded.counts.expired


def test_follow_never_hangs_on_a_run_that_cannot_finish(seeded: Seeded,
                                                        store: RunStore) -> None:
    settings = settings_of(seeded)
    assert store.enqueue("queued-forever", "test")
    with pytest.raises(RunStuck, match="still queued after"):
        follow_run(store, "queued-forever", ProgressBar("t"), settings=settings,
                   pickup_timeout=0, poll=0.05)
    store.client.delete(f"{store.prefix}:run:queued-forever")
    with pytest.raises(RunStuck, match="no longer in the run store"):
        follow_run(store, "queued-forever", ProgressBar("t"), settings=settings, poll=0.05)
    run_id, _ = plan_run(seeded, store)
    age_run(store, run_id, 3600)  # stalled for longer than the pump needs to re-send
    shown = io.StringIO()
    with pytest.raises(RunStuck, match=f"run {run_id} is stalled"):
        follow_run(store, run_id, ProgressBar("t", stream=shown), settings=settings, poll=0.05)
    # The progress line says stalled where a frozen ETA stood.
    assert "STALLED: no chunk finished for 3600s" in shown.getvalue()
    assert "ETA" not in shown.getvalue()


# --- cleanup: queued from the start, --wait ends --------------------------------------------


def test_a_dispatched_run_is_queued_at_once_and_wait_gives_up_when_no_worker_takes_it(
        seeded: Seeded, store: RunStore) -> None:
    broker = redis.Redis.from_url(REDIS_URL)
    queue = seeded.env["STATESWEEP_CONTROL_QUEUE"]
    try:
        sent = seeded.invoke("cleanup")
        assert sent.exit_code == EXIT_OK, sent.stderr
        run_id = sent.stdout.strip()
        shown = as_json(seeded.invoke("status", run_id, "--format", "json"))
        assert shown["state"] == "queued" and shown["condition"]["state"] == "queued"
        assert "queued" in seeded.invoke("status", run_id).stdout

        waited = seeded.invoke("cleanup", "--wait", "--pickup-timeout", "1s")
        assert waited.exit_code == EXIT_STUCK
        assert "is still queued after 1s: no worker has taken its coordinator" in waited.stderr
        bad = seeded.invoke("cleanup", "--wait", "--pickup-timeout", "soon")
        assert bad.exit_code == EXIT_BAD_ARGUMENT and "--pickup-timeout: 'soon'" in bad.stderr

        swept = seeded.invoke("orphans")  # the id it prints is known to status at once, too
        assert swept.exit_code == EXIT_OK, swept.stderr
        sweep = as_json(seeded.invoke("status", swept.stdout.strip(), "--format", "json"))
        assert sweep["state"] == "queued" and sweep["sweep_id"] == f"orphans-{swept.stdout.strip()}"
    finally:
        broker.delete(queue)
        broker.close()
    assert seeded.task_rows() == ROWS  # nothing deleted: no worker took the runs


def test_wait_exits_aborted_when_the_run_is_aborted_while_queued(seeded: Seeded,
                                                                 store: RunStore) -> None:
    broker = redis.Redis.from_url(REDIS_URL)
    queue = seeded.env["STATESWEEP_CONTROL_QUEUE"]
    proc = subprocess.Popen([STATESWEEP, "cleanup", "--wait"], env=child_env(seeded.env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        queued: list[str] = []
        while not queued and proc.poll() is None and time.monotonic() < deadline:
            queued = [r.run_id for r in store.recent() if r.state == "queued"]
            time.sleep(0.1)
        assert queued, "the run was never recorded as queued"
        aborted = seeded.invoke("abort", queued[0])
        assert aborted.exit_code == EXIT_OK, aborted.stderr
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        broker.delete(queue)
        broker.close()
    assert proc.returncode == EXIT_ABORTED, err
    assert f"error: run {queued[0]} was aborted before it finished" in err
    assert f"run {queued[0]} aborted" in out and "Traceback" not in err


# --- failed triggers, orphan sweeps, doctor's beat, dry run ---------------------------------


def test_a_failed_trigger_is_listed_by_status_with_its_error(seeded: Seeded,
                                                             store: RunStore) -> None:
    # A database whose table lost a column after statesweep resolved it: planning fails.
    with seeded.engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE {seeded.tables.task_state.name} DROP COLUMN expires_at"))
    with pytest.raises(Exception, match="expires_at"):
        coordinator.coordinate(settings_of(seeded), seeded.engine, seeded.tables, store,
                               Outbox(), run_id="broken-run", source="beat")
    assert store.active_run() is None
    data = as_json(seeded.invoke("status", "--format", "json"))
    failed = data["failed_triggers"]
    assert [f["run_id"] for f in failed] == ["broken-run"] and "expires_at" in failed[0]["error"]
    assert failed[0]["source"] == "beat" and failed[0]["at"].endswith("+00:00")
    assert data["runs"][0]["run_id"] == "broken-run" and data["runs"][0]["state"] == "failed"
    text_out = seeded.invoke("status").stdout
    assert "failed triggers (newest first):" in text_out and "broken-run" in text_out


def test_orphan_sweeps_are_listed_and_found_by_task_id_or_run_id(seeded: Seeded,
                                                                 store: RunStore) -> None:
    store.record_sweep("orphans-task-1", "running", table="asset_state")
    store.record_sweep("orphans-task-1", "finished", rows=12, batches=1, seconds=0.5, error="")
    store.record_sweep("orphans-task-2", "failed", error="OperationalError: connection refused")
    data = as_json(seeded.invoke("status", "--format", "json"))
    assert [(s["sweep_id"], s["state"]) for s in data["sweeps"]] == [
        ("orphans-task-2", "failed"), ("orphans-task-1", "finished")]
    for given in ("task-1", "orphans-task-1"):
        one = as_json(seeded.invoke("status", given, "--format", "json"))
        assert one["rows"] == 12 and one["batches"] == 1 and one["table"] == "asset_state"
    shown = seeded.invoke("status", "task-2")
    assert "orphan sweep orphans-task-2 failed" in shown.stdout
    assert "connection refused" in shown.stdout
    assert "12 rows in 1 batch " in seeded.invoke("status").stdout


def test_doctor_says_when_beat_last_triggered_and_warns_of_a_second_beat(
        seeded: Seeded, store: RunStore) -> None:
    def beat_checks() -> dict[str, dict[str, str]]:
        # No worker consumes this test's queues, so doctor is unhealthy; the checks still show.
        data = json.loads(seeded.invoke("doctor", "--format", "json").stdout)
        return {c["name"]: c for c in data["checks"]}

    checks = beat_checks()
    assert checks["beat"]["status"] == "warn"
    assert "the first comes one period (600s" in checks["beat"]["detail"]
    assert checks["pause"] == {"name": "pause", "status": "ok", "detail": "not paused"}

    key = f"{store.prefix}:triggers:beat"
    store.client.lpush(key, time.time() - 3 * 600 - 60)
    checks = beat_checks()
    assert checks["beat"]["status"] == "warn" and "over 3x the coordinator" in checks["beat"][
        "detail"]
    assert "second beat" not in checks

    store.client.delete(key)
    store.note_trigger("started", "r1", "beat")
    store.note_trigger("skipped", "r2", "beat", "run r1 is active")
    store.note_trigger("skipped", "r3", "cli", "run r1 is active")  # ad hoc: not a beat
    checks = beat_checks()
    assert checks["beat"]["status"] == "ok"
    assert checks["second beat"]["status"] == "warn"
    assert "a second beat is probably running" in checks["second beat"]["detail"]
    assert checks["triggers"]["status"] == "ok" and "skipped" in checks["triggers"]["detail"]


def test_dry_run_names_the_planner_that_would_run_and_why(seeded: Seeded) -> None:
    before = seeded.task_rows()
    data = as_json(seeded.invoke("cleanup", "--dry-run", "--batch-size", "2000",
                                 "--format", "json"))
    assert data["planner"] in ("blocks", "walk") and data["planner_reason"].startswith("auto: ")
    assert data["estimated_chunks"] >= 1
    forced = as_json(seeded.invoke("cleanup", "--dry-run", "--format", "json",
                                   STATESWEEP_PLANNER="walk"))
    assert forced["planner"] == "walk"
    assert forced["planner_reason"].startswith("set by STATESWEEP_PLANNER")
    shown = seeded.invoke("cleanup", "--dry-run").stdout
    assert "  planner       " in shown and "  because       " in shown
    assert seeded.task_rows() == before


def test_pause_resume_and_abort_are_normal_actions_and_print_no_warnings(
        seeded: Seeded, store: RunStore) -> None:
    """Issue 22, item 8: an operator's pause, resume or abort is what they asked for; it says
    so on stdout and logs at INFO (shown with -v), not as a warning on stderr."""
    for args in (("pause", "--reason", "deploy"), ("resume",)):
        result = seeded.invoke(*args)
        assert result.exit_code == EXIT_OK, result.stderr
        assert result.stderr == "", result.stderr
    run_id, _ = plan_run(seeded, store)
    aborted = seeded.invoke("abort", run_id)
    assert aborted.exit_code == EXIT_OK, aborted.stderr
    assert "warning" not in aborted.stderr.lower() and "cleanup_run_aborted" not in aborted.stderr
    assert store.get(run_id).state == "aborted"  # type: ignore[union-attr]
    verbose = seeded.invoke("-v", "pause")
    assert "cleanup_paused" in verbose.stderr
