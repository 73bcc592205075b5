"""Workers on hosts of their own, and one host cut off the network mid-chunk.

Three network namespaces run real ``celery worker`` processes; PostgreSQL and (for RabbitMQ)
the broker are reached through forwarders on the root ends of their veth pairs, Redis is a
private server bound there. A chunk is pinned mid-DELETE on one host by a row lock, and that
host's link goes down: its connections hang, nothing closes them. Then:

- PostgreSQL ends the cut-off host's transaction by itself: the chunk sets
  idle_in_transaction_session_timeout (its statement timeout) for its own transaction, so the
  session that can never receive its COMMIT is terminated and rolled back.
- The chunk comes back to another host: RabbitMQ drops the silent connection after missed
  heartbeats and requeues at once; Redis restores it after the visibility timeout.
- The other hosts finish the run; its counts are exact.
- Healed, the host reconnects and alone runs the next run.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy import text, update
from sqlalchemy.engine import make_url

from tests.brokers import BROKERS, machine_rabbitmq, rabbit_vhost
from tests.netns import Host, forwarding, network_hosts, redis_on, start_host_worker
from tests.processes import WorkerProcess, wait_for_run
from tests.reliability.conftest import Scenario, Seeder
from tests.reliability.faults import hold_row_lock, wait_for_lock_waiter
from tests.reliability.pipeline import Pipeline, pipeline_env
from workers.seed import SeedSpec, kind_of

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

# Short limits so a Redis redelivery comes within the test (visibility > 2x hard limit); the
# lock wait outlasts the moment between the chunk blocking and the partition.
LIMITS = {"cleanup_batch_size": 2000, "visibility_timeout": 20, "chunk_time_limit": 10,
          "chunk_soft_time_limit": 8, "lock_timeout_ms": 6000, "statement_timeout_ms": 7000,
          "lock_ttl_seconds": 19}  # below the visibility timeout, as settings require


def _session_gone(p: Pipeline, pid: int, timeout: float) -> str:
    """Wait until PostgreSQL has ended backend *pid*; returns the last state it showed."""
    sql = text("SELECT state FROM pg_stat_activity WHERE pid = :pid")
    deadline = time.monotonic() + timeout
    last = "active"
    while time.monotonic() < deadline:
        with p.engine.connect() as conn:
            row = conn.execute(sql, {"pid": pid}).first()
        if row is None:
            return last
        last = str(row.state)
        time.sleep(0.2)
    raise TimeoutError(f"backend {pid} still {last!r} after {timeout}s")


@pytest.mark.parametrize("broker_name", BROKERS)
def test_partitioned_host_loses_no_work_and_rejoins(
        broker_name: str, pg_url: str, seeded: Seeder, isolation: dict[str, str],
        tmp_path: Path, scenario: Scenario) -> None:
    spec = SeedSpec(rows=100_000)
    engine, tables = seeded(spec)
    pg = make_url(pg_url)
    with ExitStack() as stack:
        hosts = stack.enter_context(network_hosts(3))
        roots = tuple(h.root_addr for h in hosts)
        pg_fwd = stack.enter_context(forwarding(roots, (pg.host or "127.0.0.1", pg.port or 5432)))
        redis_port = stack.enter_context(redis_on(roots))
        vhost = amqp_fwd = None
        if broker_name == "rabbitmq":
            vhost = stack.enter_context(rabbit_vhost(machine_rabbitmq()))
            amqp_fwd = stack.enter_context(forwarding(roots, ("127.0.0.1", 5672)))

        def broker_at(addr: str) -> str:
            if vhost is None:
                return f"redis://{addr}:{redis_port}/0"
            port = 5672 if addr == "127.0.0.1" else amqp_fwd.port  # type: ignore[union-attr]
            return f"amqp://guest:guest@{addr}:{port}/{vhost.vhost}"

        def host_env(h: Host) -> dict[str, str]:
            db = pg.set(host=h.root_addr, port=pg_fwd.port).render_as_string(hide_password=False)
            return pipeline_env(db, f"redis://{h.root_addr}:{redis_port}/0", isolation,
                                broker_url=broker_at(h.root_addr), **LIMITS)

        env = pipeline_env(pg_url, f"redis://127.0.0.1:{redis_port}/0", isolation,
                           broker_url=broker_at("127.0.0.1"), **LIMITS)
        p = Pipeline(env, engine, tables, spec, tmp_path)
        before = p.counts()
        scenario.before(before)
        workers: list[WorkerProcess] = []
        stack.callback(lambda: [w.stop(timeout=10) for w in workers])
        for i, h in enumerate(hosts, 1):
            workers.append(start_host_worker(h, host_env(h), tmp_path, f"h{i}"))

        # Row 50_001 is expired and mid-table: the chunk holding it blocks on this lock, so
        # one host is certainly mid-DELETE, in an open transaction, when it is cut off.
        with p.client() as app, hold_row_lock(engine, tables.task_state.name, 50_001):
            p.trigger(app)
            run_id = p.wait_for_run_id()
            p.wait_for_state(run_id, ("running",))
            pid, port = wait_for_lock_waiter(engine)
            addr = pg_fwd.peer_of(port)
            [cut] = [i for i, h in enumerate(hosts) if h.addr == addr]
            hosts[cut].partition()
            cut_at = time.monotonic()
        # The lock is released: the cut-off DELETE finishes on the server, whose reply and the
        # COMMIT that should follow are lost. PostgreSQL must end the transaction by itself.
        last_state = _session_gone(p, pid, timeout=60)
        txn_ended = time.monotonic() - cut_at
        record = wait_for_run(env, run_id, timeout=180)
        recovered = time.monotonic() - cut_at
        after_run = p.counts()
        hosts[cut].heal()

        # Rejoin: only the healed host runs the next run. Its rows are live ones made expired.
        for i, w in enumerate(workers):
            if i != cut:
                w.stop()
        flipped = [i + 1 for i in range(spec.rows) if kind_of(i, spec) == "future"][:4000]
        t = tables.task_state
        with engine.begin() as conn:
            conn.execute(update(t).where(t.c.id.in_(flipped))
                         .values(expires_at=text("now() - interval '1 hour'")))
        healed_at = time.monotonic()
        with p.client() as app:
            second = p.trigger(app).get(timeout=120)
        second_record = wait_for_run(env, second["run_id"], timeout=180)
        rejoined = time.monotonic() - healed_at
        after = p.counts()
        rejoined_log = workers[cut].log()

    scenario.after(after)
    scenario.note(broker=broker_name, partitioned=f"h{cut + 1}", chunks=record.chunks_planned,
                  expired_after_first_run=after_run.expired, cut_session_state=last_state,
                  txn_ended_s=round(txn_ended, 1), recovery_s=round(recovered, 1),
                  rejoin_run_s=round(rejoined, 1), second_run_rows=second_record.rows_deleted,
                  live_lost=before.live - len(flipped) - after.live)
    # The cut-off host's transaction was idle, waiting for a COMMIT that never came.
    assert last_state.startswith("idle in transaction"), last_state
    assert (record.state, record.chunks_done) == ("finished", record.chunks_planned), record
    # Exactly the rows that were expired (expected_rows is only the planner's estimate now).
    assert record.rows_deleted == before.expired
    assert after_run.expired == 0
    # The healed host alone ran the second run, exactly.
    assert second["status"] == "started"
    assert (second_record.state, second_record.rows_deleted) == ("finished", len(flipped))
    assert rejoined_log.count(second["run_id"]) > 0
    assert after.expired == 0
    flipped_ids = set(flipped)
    assert p.rows() == {r for r in p.survivors() if r[0] not in flipped_ids}
