"""Processes die mid-run: a chunk worker SIGKILLed with chunks in flight, a coordinator
SIGKILLed while it plans. Nothing live is lost and no expired row is left behind for good."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.brokers import BROKERS, Broker
from tests.processes import WorkerProcess, start_worker, wait_for_run
from tests.reliability.conftest import Scenario, Seeder
from tests.reliability.faults import (
    RedisServer,
    hold_row_lock,
    owns_local_port,
    unacked_messages,
    wait_for_lock_waiter,
)
from tests.reliability.pipeline import Pipeline, pipeline_env
from workers.celery_app import PUMP
from workers.runs import BEAT_TTL_SECONDS, RunRecord
from workers.seed import SeedSpec
from workers.window import resend_after

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(90)]

VISIBILITY = 10
# What settings require with those limits: the coordinator's lock lapses before Redis would
# redeliver it, and a DELETE's statement timeout comes before the 3 s soft limit.
SHORT_LIMITS = {"lock_ttl_seconds": VISIBILITY - 1, "statement_timeout_ms": 2500}


@pytest.mark.timeout(150)  # a lost message waits out resend_after (34 s here) before its resend
@pytest.mark.parametrize("fault_broker", BROKERS, indirect=True)
def test_worker_sigkilled_with_chunks_in_flight_loses_no_work(
        pg_url: str, seeded: Seeder, isolation: dict[str, str], redis_server: RedisServer,
        fault_broker: Broker, tmp_path: Path, scenario: Scenario) -> None:
    spec = SeedSpec(rows=200_000)
    engine, tables = seeded(spec)
    # Redis hands an unacknowledged message to another worker only after the visibility
    # timeout; keep it short here (settings require it to be at least twice the hard limit).
    # RabbitMQ redelivers as soon as the dead worker's connection closes.
    env = pipeline_env(pg_url, redis_server.url, isolation, cleanup_batch_size=2000,
                       visibility_timeout=VISIBILITY, chunk_time_limit=4,
                       chunk_soft_time_limit=3, broker_url=fault_broker.url, **SHORT_LIMITS)
    p = Pipeline(env, engine, tables, spec, tmp_path)
    scenario.before(p.counts())
    started: list[WorkerProcess] = []
    try:
        started += [start_worker(env, tmp_path, "a"), start_worker(env, tmp_path, "b")]
        # Row 100_001 is expired and sits mid-table: the chunk holding it waits on this lock,
        # so a worker is certainly mid-DELETE, in an open transaction, when it is killed.
        with p.client() as app, hold_row_lock(engine, tables.task_state.name, 100_001):
            p.trigger(app)
            run_id = p.wait_for_run_id()
            p.wait_for_state(run_id, ("running",))
            _, port = wait_for_lock_waiter(engine)
            victims = [w for w in started if owns_local_port(w.proc.pid, port)]
            assert len(victims) == 1, "the blocked chunk belongs to exactly one worker"
            at_kill = p.registry.get(run_id)
            assert at_kill is not None
            if fault_broker.is_amqp:
                # Planned, neither finished nor waiting in the queue: held by the workers.
                in_flight = (at_kill.chunks_planned - at_kill.chunks_done
                             - fault_broker.ready(p.settings.chunk_queue))
            else:
                in_flight = fault_broker.unacked(p.settings.chunk_queue)
            victims[0].kill()
            killed_at = time.monotonic()
        assert at_kill is not None and at_kill.chunks_done < at_kill.chunks_planned
        # A replacement, as compose's restart policy would start. On Redis any live worker
        # restores the dead one's messages once past the visibility timeout (kombu scans every
        # 10 s); on RabbitMQ they are back in the queue already.
        started.append(start_worker(env, tmp_path, "c"))
        # Two ways a chunk's message is lost for good, on either broker: the kill lands
        # between a top-up's cut (its window entry written in Redis) and its publish, so the
        # message never exists; or (Redis only) the dead worker had taken a message off the
        # queue but not yet recorded it as unacked (kombu's BRPOP window). Nothing finishing
        # can tell such a chunk from a slow one until resend_after has passed since it was
        # cut (before the kill); then the next trigger (or beat's pump) sends it again. That
        # is what the design guarantees: the run completes, recovery bounded by resend_after.
        resumed = None
        try:
            record = wait_for_run(env, run_id, timeout=resend_after(p.settings) + 5)
        except TimeoutError:
            with p.client() as app:
                resumed = p.trigger(app).get(timeout=30)
            assert resumed["status"] == "resumed" and resumed["run_id"] == run_id, resumed
            assert resumed["chunks"] >= 1, resumed
            record = wait_for_run(env, run_id, timeout=30)
        recovery = time.monotonic() - killed_at
    finally:
        for w in started:
            w.stop()
    after = p.counts()
    scenario.after(after)
    scenario.note(broker=fault_broker.name, chunks=record.chunks_planned,
                  chunks_done_at_kill=at_kill.chunks_done, unacked_at_kill=in_flight,
                  killed=victims[0].name, resumed_chunks=resumed["chunks"] if resumed else 0,
                  recovery_s=round(recovery, 1))
    assert in_flight >= 1
    assert record.state == "finished"
    assert record.chunks_done == record.chunks_planned
    assert after.expired == 0
    assert p.rows() == p.survivors()
    # Bounded: redelivery (RabbitMQ at once, Redis past the visibility timeout) or, for a
    # message that never existed, one resend once resend_after has passed.
    assert recovery <= resend_after(p.settings) + 5 + 30, recovery


@pytest.mark.timeout(180)
def test_coordinator_killed_while_sending_its_window_loses_no_work(
        pg_url: str, seeded: Seeder, isolation: dict[str, str], redis_server: RedisServer,
        tmp_path: Path, scenario: Scenario) -> None:
    """The coordinator is SIGKILLed while it cuts and sends its first window (walk planner,
    small batch, a wide window: hundreds of index probes). The plan is already in the run store,
    so the chunks it sent cut and send the rest, and the run completes with no coordinator.

    The kill can also land between a cut (its window entry recorded) and its publish, about one
    time in ten here: that one chunk's message never exists. Nothing finishing can tell it from
    a slow chunk until resend_after has passed, so the run stalls with that one chunk out; the
    next trigger after that (beat's, here the test's, on a fresh control worker) sends it again,
    as for any lost message, and the run completes."""
    # 550 chunks of 100 rows: enough cuts that the kill lands mid-window, few enough that a
    # loaded machine (the suite runs tests side by side) deletes them well within the timeout.
    spec = SeedSpec(rows=100_000)
    engine, tables = seeded(spec)
    env = pipeline_env(pg_url, redis_server.url, isolation, cleanup_batch_size=100,
                       planner="walk", max_chunks_in_flight=2000, chunk_time_limit=4,
                       chunk_soft_time_limit=3, statement_timeout_ms=2500)
    p = Pipeline(env, engine, tables, spec, tmp_path)
    control, chunks = p.settings.control_queue, p.settings.chunk_queue
    scenario.before(p.counts())
    started: list[WorkerProcess] = []
    try:
        coord = start_worker(env, tmp_path, "coord", pool="solo", concurrency=1, queues=control)
        started += [coord, start_worker(env, tmp_path, "chunks", queues=chunks)]
        with p.client() as app:
            p.trigger(app)
            run_id = p.wait_for_run_id()
            deadline = time.monotonic() + 30
            while True:
                rec = p.registry.get(run_id)
                if rec is not None and rec.chunks_planned >= 50:
                    break
                assert time.monotonic() < deadline, "the window never got far enough"
                time.sleep(0.01)
            coord.kill()
            killed_at = time.time()
            at_kill = p.registry.get(run_id)
            assert at_kill is not None and at_kill.state == "running"
            assert not at_kill.planning_done
            record = _finished_or_stalled(p, run_id, quiet=8.0, timeout=120)
            resumed = None
            if record.state != "finished":
                # Killed between a cut and its publish: exactly that one chunk is out.
                assert record.planning_done, record
                assert record.chunks_planned - record.chunks_done == 1, record
                started.append(start_worker(env, tmp_path, "coord2", pool="solo",
                                            concurrency=1, queues=control))
                time.sleep(max(0.0, killed_at + resend_after(p.settings) + 1 - time.time()))
                resumed = p.trigger(app).get(timeout=30)
                assert resumed["status"] == "resumed" and resumed["run_id"] == run_id, resumed
                assert resumed["chunks"] == 1, resumed
                record = wait_for_run(env, run_id, timeout=30)
        lock_after = p.registry.active_run()
    finally:
        for w in started:
            w.stop()
    after = p.counts()
    scenario.after(after)
    scenario.note(chunks_cut_at_kill=at_kill.chunks_planned, chunks=record.chunks_planned,
                  lost_messages=0 if resumed is None else 1)
    assert record.state == "finished" and record.chunks_done == record.chunks_planned
    assert record.chunks_planned > at_kill.chunks_planned
    assert record.rows_deleted == scenario.data["expired_before"]
    assert lock_after is None
    assert after.expired == 0
    assert p.rows() == p.survivors()


@pytest.mark.timeout(150)
def test_coordinator_killed_while_planning_is_sent_again_by_the_pump(
        pg_url: str, seeded: Seeder, isolation: dict[str, str], redis_server: RedisServer,
        tmp_path: Path, scenario: Scenario) -> None:
    """The coordinator is SIGKILLed mid-plan (its probe waits on a table lock), on Redis as
    broker with the default visibility timeout (90 s): Redis would give its message back only
    then. Its planning heartbeat lapses within BEAT_TTL_SECONDS, and the next pump (beat's,
    here the test's, every second) sends the coordinator again with the run's id and arguments;
    that copy takes the dead delivery's claim over, plans, and the run completes, once."""
    spec = SeedSpec(rows=20_000)
    engine, tables = seeded(spec)
    env = pipeline_env(pg_url, redis_server.url, isolation, cleanup_batch_size=2000)
    p = Pipeline(env, engine, tables, spec, tmp_path)
    control = p.settings.control_queue
    assert p.settings.visibility_timeout >= 90  # the redelivery this test must not wait for
    scenario.before(p.counts())
    started: list[WorkerProcess] = []
    try:
        coord = start_worker(env, tmp_path, "coord", pool="solo", concurrency=1, queues=control)
        started.append(coord)
        with p.client() as app:
            # The worker reads the schema at its first task: before the table is locked.
            app.send_task(PUMP, queue=control).get(timeout=30)
            holder = engine.connect()
            try:
                trans = holder.begin()
                holder.exec_driver_sql(
                    f"LOCK TABLE {tables.task_state.name} IN ACCESS EXCLUSIVE MODE")
                p.trigger(app, batch_size=1000)
                run_id = p.wait_for_run_id()
                p.wait_for_state(run_id, ("planning",))
                _, port = wait_for_lock_waiter(engine)
                assert owns_local_port(coord.proc.pid, port), "the planner waits on the lock"
                coord.kill()
                killed_at = time.monotonic()
                trans.rollback()
            finally:
                holder.close()
            at_kill = p.registry.get(run_id)
            assert at_kill is not None and at_kill.state == "planning"
            started += [start_worker(env, tmp_path, "coord2", queues=control),
                        start_worker(env, tmp_path, "chunks", queues=p.settings.chunk_queue)]
            deadline = time.monotonic() + 60
            record = at_kill
            while not record.ended:  # beat's pump, every second
                assert time.monotonic() < deadline, f"never finished: {record}"
                app.send_task(PUMP, queue=control)
                time.sleep(1)
                record = p.registry.get(run_id) or record
            recovery = time.monotonic() - killed_at
    finally:
        for w in started:
            w.stop()
    after = p.counts()
    scenario.after(after)
    scenario.note(recovery_s=round(recovery, 1), replans=record.replans)
    assert record.state == "finished", record
    assert record.replans == 1, record
    assert record.source == "adhoc" and record.batch_size == 1000, record
    assert record.chunks_done == record.chunks_planned
    assert record.rows_deleted == scenario.data["expired_before"]
    assert after.expired == 0
    assert p.rows() == p.survivors()
    # Well before Redis's redelivery: the heartbeat's TTL, a pump, a worker's start and a plan.
    assert recovery < p.settings.visibility_timeout - 30, (recovery, BEAT_TTL_SECONDS)


def _finished_or_stalled(p: Pipeline, run_id: str, *, quiet: float,
                         timeout: float) -> RunRecord:
    """The run once it has finished, or once no chunk has finished for *quiet* seconds (counted
    from the first chunk done, so a worker slow to start is not a stall)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        record = p.registry.get(run_id)
        assert record is not None
        if record.state in ("finished", "failed"):
            return record
        if record.chunks_done != last or not record.chunks_done:
            last, since = record.chunks_done, time.monotonic()
        elif time.monotonic() - since > quiet:
            return record
        time.sleep(0.2)
    raise TimeoutError(f"run {run_id} neither finished nor stalled in {timeout}s")


def _wait_for_queue_drained(redis_url: str, queue: str, timeout: float = 60) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if client.llen(queue) == 0 and unacked_messages(redis_url, queue) == 0:
                return
            time.sleep(0.1)
    finally:
        client.close()
    raise TimeoutError(f"queue {queue} not drained in {timeout}s")


def test_chunk_message_lost_by_the_broker_is_resent_by_the_next_trigger(
        pg_url: str, seeded: Seeder, isolation: dict[str, str], redis_server: RedisServer,
        tmp_path: Path, scenario: Scenario) -> None:
    """kombu's Redis transport BRPOPs a message before it records it as unacknowledged; a
    worker SIGKILLed in between loses it for good, and no redelivery brings it back. Here the
    loss is made certain: one chunk message is taken off the queue before any chunk worker
    runs. The run stalls; the next trigger after the stall period sends the missing chunk."""
    import redis

    spec = SeedSpec(rows=20_000)
    engine, tables = seeded(spec)
    env = pipeline_env(pg_url, redis_server.url, isolation, cleanup_batch_size=1000,
                       visibility_timeout=VISIBILITY, chunk_time_limit=4,
                       chunk_soft_time_limit=3, planner="walk", **SHORT_LIMITS)
    p = Pipeline(env, engine, tables, spec, tmp_path)
    control, chunks = p.settings.control_queue, p.settings.chunk_queue
    scenario.before(p.counts())
    started: list[WorkerProcess] = []
    try:
        started.append(start_worker(env, tmp_path, "coord", queues=control))
        with p.client() as app:
            summary = p.trigger(app).get(timeout=30)
            run_id = summary["run_id"]
            broker = redis.Redis.from_url(redis_server.url)
            assert broker.llen(chunks) == summary["chunks"] == 11
            assert broker.rpop(chunks) is not None  # the message the broker lost
            started.append(start_worker(env, tmp_path, "chunks", queues=chunks))
            stalled = p.wait_for_state(run_id, ("running",))
            deadline = time.monotonic() + 30
            while (stalled := p.registry.get(run_id)) is not None and stalled.chunks_done < 10:
                assert time.monotonic() < deadline, stalled
                time.sleep(0.1)
            # Before the stall period a trigger cannot tell a lost chunk from a slow one.
            early = p.trigger(app).get(timeout=30)
            assert early["status"] == "skipped" and early["active_run_id"] == run_id
            # A chunk sent resend_after ago and not finished is sent again (wall clock).
            quiet_until = stalled.planned_at + resend_after(p.settings) + 1
            time.sleep(max(0.0, quiet_until - time.time()))
            resumed = p.trigger(app).get(timeout=30)
        record = wait_for_run(env, run_id, timeout=30)
    finally:
        for w in started:
            w.stop()
    after = p.counts()
    scenario.after(after)
    scenario.note(chunks=record.chunks_planned, lost_messages=1,
                  resumed_chunks=resumed["chunks"])
    assert stalled is not None and stalled.chunks_done == 10 and stalled.state == "running"
    assert resumed["status"] == "resumed" and resumed["run_id"] == run_id
    assert resumed["chunks"] == 1
    assert record.state == "finished" and record.chunks_done == record.chunks_planned == 11
    assert after.expired == 0
    assert p.rows() == p.survivors()
