"""statesweep end to end, on real processes: a trigger sent by name to the control queue, the
coordinator in a dedicated ``-P solo`` worker (so its RSS is the coordinator's alone), and N
chunk workers (``-P prefork -c 1`` each) on the chunk queue; done when the run store says the
run finished. Chunk timings come from the workers' JSON logs (``chunk_deleted`` events)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench import pyspy
from bench.methods import MethodResult
from bench.observe import RssSampler, percentile
from bench.worker_logs import FailureWatch, chunk_starts, log_events, task_seconds, wall
from tests.processes import WorkerProcess, start_worker
from workers.celery_app import COORDINATE, SWEEP_ORPHANS, build_app
from workers.coordinator import new_run_id
from workers.runs import registry_for
from workers.settings import Settings

#: PGAPPNAME of the coordinator and chunk workers' connections (pg_stat_activity, CPU).
SWEEP_APPS = ("statesweep_coordinator", "statesweep_chunks")


def worker_env(url: str, redis_url: str, tag: str, batch: int,
               chunk_rate_limit: str = "", extra: dict[str, str] | None = None) -> dict[str, str]:
    """STATESWEEP_* for this bench run: its own key prefix and queues, JSON logs; *extra* (a
    method's planner or throttle) on top."""
    env = {
        "STATESWEEP_DATABASE_URL": url,
        "STATESWEEP_BROKER_URL": redis_url,
        "STATESWEEP_RESULT_BACKEND": redis_url,
        "STATESWEEP_KEY_PREFIX": f"bench:{tag}",
        "STATESWEEP_CONTROL_QUEUE": f"bench.{tag}.control",
        "STATESWEEP_CHUNK_QUEUE": f"bench.{tag}.chunks",
        "STATESWEEP_TABLE_NAMING": "seed",
        "STATESWEEP_CLEANUP_BATCH_SIZE": str(batch),
        "STATESWEEP_LOG_FORMAT": "json",
    }
    if chunk_rate_limit:
        env["STATESWEEP_CHUNK_RATE_LIMIT"] = chunk_rate_limit
    return {**env, **(extra or {})}


@dataclass
class Fleet:
    """The worker processes of one statesweep method, started before it is timed."""

    env: dict[str, str]
    control: WorkerProcess
    chunk_workers: list[WorkerProcess]

    @classmethod
    def start(cls, env: dict[str, str], log_dir: Path, name: str, workers: int,
              pool: str = "prefork") -> Fleet:
        started: list[WorkerProcess] = []
        try:
            # PGAPPNAME tags each process's connections in pg_stat_activity.
            control = start_worker({**env, "PGAPPNAME": SWEEP_APPS[0]}, log_dir,
                                   f"{name}-control", pool="solo", concurrency=1,
                                   queues=env["STATESWEEP_CONTROL_QUEUE"])
            started.append(control)
            for i in range(workers):
                started.append(start_worker(
                    {**env, "PGAPPNAME": SWEEP_APPS[1]}, log_dir, f"{name}-chunks{i + 1}",
                    pool=pool, concurrency=1, queues=env["STATESWEEP_CHUNK_QUEUE"]))
        except BaseException:
            for w in started:
                w.stop()
            raise
        return cls(env, control, started[1:])

    def processes(self) -> list[tuple[str, int]]:
        """(label, pid) of the worker processes, for CPU accounting."""
        return [("coordinator worker", self.control.proc.pid)] + [
            ("chunk workers", w.proc.pid) for w in self.chunk_workers]

    def reconnect(self, tries: int = 10) -> list[str]:
        """Have every worker process reconnect to the freshly cloned database before the run.

        The clone drops and recreates the database, which ends the pooled connections of
        workers that have been running; production workers have warm pools, so the first
        planning step and the first chunk of a measured run must not pay a reconnect. An orphan
        sweep touches only asset state (never measured here) and opens the process's engine:
        one on the control queue, then one at a time on the chunk queue until each chunk
        worker's log shows it ran one. Returns the worker names still cold (normally none)."""
        settings = Settings.from_env(self.env)
        app = build_app(settings, include_tasks=False)
        try:
            app.send_task(SWEEP_ORPHANS, queue=settings.control_queue,
                          kwargs={"batch_size": 1000}).get(timeout=120)
            cold = list(self.chunk_workers)
            for _ in range(tries):
                if not cold:
                    break
                app.send_task(SWEEP_ORPHANS, queue=settings.chunk_queue,
                              kwargs={"batch_size": 1000}).get(timeout=120)
                # Celery logs "Task <name>[<id>] received/succeeded" in the worker that ran it.
                cold = [w for w in cold if SWEEP_ORPHANS + "[" not in w.log()]
        finally:
            app.close()
        return [w.name for w in cold]

    def stop(self) -> None:
        for w in (self.control, *self.chunk_workers):
            w.stop()

    def run(self, name: str, batch: int, timeout: float,
            profile_dir: Path | None = None) -> MethodResult:
        """Trigger one run and wait for it; with *profile_dir*, py-spy records the coordinator
        and the first chunk worker's pool process while it runs."""
        settings = Settings.from_env(self.env)
        app = build_app(settings, include_tasks=False)
        registry = registry_for(settings.effective_run_store_url, settings.key_prefix)
        result = MethodResult(name)
        spies: dict[str, pyspy.Recording] = {}
        if profile_dir is not None:
            pool = psutil.Process(self.chunk_workers[0].proc.pid).children()[0].pid
            spies = {"coordinator": pyspy.record(self.control.proc.pid,
                                                 profile_dir / f"{name}-coordinator.txt"),
                     "chunk_worker": pyspy.record(pool, profile_dir / f"{name}-chunks.txt")}
            time.sleep(1)  # py-spy attaches
        with RssSampler(self.control.proc.pid) as rss:
            result.started_wall = time.time()
            # Naming the run up front lets this follow it from the run store at once, rather
            # than after the coordinator's result (which comes when planning is done).
            run_id = new_run_id()
            sent = app.send_task(COORDINATE, queue=settings.control_queue, kwargs={
                "batch_size": batch, "source": "bench", "run_id": run_id})
            deadline = time.monotonic() + timeout
            watch = FailureWatch([w.log_path for w in (self.control, *self.chunk_workers)])
            polls = 0
            while True:
                record = registry.get(run_id)
                if record is not None and record.state in ("finished", "failed"):
                    break
                if record is None and sent.ready():
                    raise RuntimeError(f"run {run_id} never started: {sent.get(timeout=10)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"statesweep run {run_id} not finished in {timeout}s")
                polls += 1
                failed = watch.first_failure() if polls % 20 == 0 else None
                if failed:
                    raise RuntimeError(f"statesweep run {run_id}: a task failed: {failed}")
                time.sleep(0.05)
        app.close()
        if spies:
            result.detail["py_spy"] = {k: v.stop() for k, v in spies.items()}
        if record.state != "finished":
            raise RuntimeError(f"statesweep run {run_id} failed: {record.error}")
        result.ended_wall = record.finished_at
        result.seconds = record.finished_at - result.started_wall
        result.rows = record.rows_deleted
        chunks: list[dict[str, Any]] = []
        tasks: list[float] = []
        per_worker: list[int] = []
        for w in self.chunk_workers:
            events = log_events(w.log_path, run_id)
            done = [e for e in events if e["event"] == "chunk_deleted"]
            chunks += done
            per_worker.append(len(done))
            tasks += task_seconds(events)
        coordinator = log_events(self.control.log_path, run_id)
        started = next((e for e in coordinator if e["event"] == "cleanup_run_started"), {})
        dispatched = next((e for e in coordinator if e["event"] == "cleanup_run_dispatched"), {})
        result.txn_ms = [float(e["ms"]) for e in chunks]
        rows = [int(e["rows"]) for e in chunks]
        # cleanup_run_dispatched is logged as soon as its ms (since the coordinator began,
        # before it read the cutoff) is taken: the first DELETE's start is measured from there.
        began = wall(dispatched) - float(dispatched["ms"]) / 1000 if dispatched else None
        starts = chunk_starts(chunks)
        result.longest_txn_ms = max(result.txn_ms, default=0.0)
        result.longest_txn_source = "chunk_deleted ms (DELETE + COMMIT) in the worker logs"
        result.detail = {
            **result.detail,
            "run_id": run_id,
            "workers": len(self.chunk_workers),
            "chunks": record.chunks_done,
            "chunks_per_worker": per_worker,
            "planner": started.get("planner"),
            "planner_reason": started.get("reason"),
            "estimated_chunks": started.get("estimated_chunks"),
            "expected_rows": started.get("expected_rows"),
            "planning_ms": started.get("plan_ms"),
            # The first window sent (ms since the coordinator began, cutoff read included).
            "dispatched_ms": dispatched.get("ms"),
            "dispatched_chunks": dispatched.get("chunks"),
            "first_delete_ms": (round((starts[0] - began) * 1000, 1)
                                if starts and began is not None else None),
            "chunk_rows_p50": percentile(rows, 50),
            "chunk_rows_max": max(rows, default=0),
            "chunk_ms_sum": round(sum(result.txn_ms), 1),
            "chunk_ms_p50": percentile(result.txn_ms, 50),
            "chunk_ms_p99": percentile(result.txn_ms, 99),
            # Celery's runtime of the tasks: run_chunk's Redis calls, db_now and logging on top
            # of the DELETE; the first task of each process also builds its engine and tables.
            "task_ms_sum": round(sum(tasks) * 1000, 1),
            "task_ms_p50": round(percentile(tasks, 50) * 1000, 1),
            "task_ms_max": round(max(tasks, default=0.0) * 1000, 1),
            "coordinator_rss_baseline_mib": round(rss.baseline_mib, 1),
            "coordinator_rss_peak_mib": round(max(rss.peak_mib, rss.baseline_mib), 1),
            "coordinator_rss_how": "RSS of the -P solo control worker (coordinator runs in it),"
                                   " psutil at 10 Hz from trigger to run finished",
        }
        return result
