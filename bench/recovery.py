"""Recovery after a single process kill, on default settings (issue 21: <= 15 s).

    python -m bench.recovery [--trials 3] [--rows 300000] [--brokers redis,rabbitmq]
                             [--cases chunk_worker,coordinator_planning,coordinator_sending,beat]

The deployment is compose's shape on real services: PostgreSQL, Redis as run store (and as
broker, or RabbitMQ in a vhost of its own), three workers on both queues (-c 2), one beat and a
standby beat. Only the database, the brokers, the key prefix, the queue names and JSON logs are
set; every limit is its default (visibility timeout, lock TTL, heartbeat, pump interval).
Each trial clones a freshly seeded database and SIGKILLs one process (its whole process group):

- chunk_worker: the worker whose chunk waits on a row lock (so it is certainly mid-DELETE);
- coordinator_planning: the worker whose coordinator waits on a table lock while it plans;
- coordinator_sending: that worker again, the moment its run turns running (sending its window);
- beat: the beat that holds the beat lock, mid-run (a standby takes over: compose's restart).

Recovery is the time from the kill until every chunk that was in the run's window at the kill
has been counted (the killed process's work done again); for coordinator_planning, until the
first chunk is counted; for beat, until the standby holds the beat lock (its first tick
sends the overdue pump), with the run's progress meanwhile recorded apart. Each trial checks
the run finished, every chunk counted once, no expired row left, the surviving rows exact.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, create_engine, text

from tests.brokers import machine_rabbitmq, rabbit_vhost
from tests.processes import CELERY, ROOT, WorkerProcess, child_env
from tests.reliability.faults import owns_local_port
from tests.reliability.pipeline import client, counts, seed_database
from workers import runs_lua
from workers.beat_lock import BEAT_LOCK_TTL_SECONDS, STANDBY_POLL_SECONDS
from workers.celery_app import COORDINATE
from workers.db import make_engine
from workers.runs import BEAT_TTL_SECONDS, registry_for
from workers.schema import build_tables
from workers.seed import SeedSpec, expected_survivors, task_state_rows
from workers.settings import Settings
from workers.window import resend_after

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/"
REDIS_URL = "redis://127.0.0.1:6379/0"
CASES = ("chunk_worker", "coordinator_planning", "coordinator_sending", "beat")
TARGET_SECONDS = 15.0
OUT = Path(__file__).parent / "results"
# What the standby beat logs when it holds the beat lock: its first tick sends the pump, overdue
# by then (its schedule was made when it started).
TOOK_OVER = "beat_took_over"
STANDBY = "beat_standby"


@contextmanager
def broker_url(name: str, redis_broker: str = REDIS_URL) -> Iterator[str]:
    if name == "redis":
        yield redis_broker
        return
    with rabbit_vhost(machine_rabbitmq()) as b:
        yield b.url


def admin(sql: str) -> None:
    engine = create_engine(PG + "postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> WorkerProcess:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(env), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return WorkerProcess(log.stem, proc, log)


def wait(predicate: Any, timeout: float, what: str, poll: float = 0.05) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(poll)
    return time.monotonic()


@dataclass
class Deployment:
    env: dict[str, str]
    workers: list[WorkerProcess]
    beats: list[WorkerProcess]

    @classmethod
    def start(cls, env: dict[str, str], logs: Path) -> Deployment:
        queues = f"{env['STATESWEEP_CONTROL_QUEUE']},{env['STATESWEEP_CHUNK_QUEUE']}"
        workers = [spawn([CELERY, "-A", "workers", "worker", "-n", f"w{i}@%h", "-c", "2",
                          "-Q", queues, "-l", "INFO", "--without-gossip", "--without-mingle"],
                         env, logs / f"w{i}.log") for i in range(3)]
        beats: list[WorkerProcess] = []
        dep = cls(env, workers, beats)
        try:
            # The second beat waits as the first one's standby; holder first, standby second.
            for name in ("beat1", "beat2"):
                beats.append(spawn([CELERY, "-A", "workers", "beat", "-l", "INFO", "-s",
                                    str(logs / f"{name}-schedule")], env, logs / f"{name}.log"))
                wait(lambda b=beats[-1]: "beat: Starting" in b.log(), 60, f"{name} not started")
                time.sleep(1)
            wait(lambda: any(STANDBY in b.log() for b in beats), 30, "no standby beat")
            beats.sort(key=lambda b: STANDBY in b.log())
            for w in workers:
                wait(lambda w=w: "ready." in w.log(), 90, f"{w.name} not ready:\n{w.log()}", 0.2)
        except BaseException:
            dep.stop()
            raise
        return dep

    def stop(self) -> None:
        for p in self.workers + self.beats:
            if p.proc.poll() is None:
                p.stop(timeout=10)


def window(r: redis.Redis, prefix: str, run_id: str) -> dict[str, str]:
    """chunk number -> state letter (c s t p) of the run's in-flight window."""
    raw = r.hgetall(f"{prefix}:run:{run_id}:inflight")
    return {str(k): str(v).split("|")[2] for k, v in raw.items()}


def owner_of_waiter(engine: Engine, procs: list[WorkerProcess],
                    timeout: float = 60) -> WorkerProcess:
    """The worker whose database session waits on a lock (the row or table lock held here)."""
    sql = text("SELECT client_port, application_name, query FROM pg_stat_activity "
               "WHERE datname = current_database() AND wait_event_type = 'Lock' "
               "AND client_port IS NOT NULL")
    deadline = time.monotonic() + timeout
    seen: list[Any] = []
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            seen = list(conn.execute(sql))
        for row in seen:
            found = [w for w in procs if owns_local_port(w.proc.pid, int(row.client_port))]
            if len(found) == 1:
                return found[0]
        time.sleep(0.05)
    raise RuntimeError(f"no worker's session waits on the lock: {seen}")


def trial(broker: str, url: str, case: str, template: str, spec: SeedSpec, n: int,
          logs: Path) -> dict[str, Any]:
    tag = f"rec{uuid.uuid4().hex[:8]}"
    db = f"sw_{tag}"
    admin(f'CREATE DATABASE "{db}" TEMPLATE "{template}"')
    env = {"STATESWEEP_DATABASE_URL": PG + db, "STATESWEEP_BROKER_URL": url,
           "STATESWEEP_RESULT_BACKEND": REDIS_URL, "STATESWEEP_KEY_PREFIX": f"bench:{tag}",
           "STATESWEEP_CONTROL_QUEUE": f"bench.{tag}.control",
           "STATESWEEP_CHUNK_QUEUE": f"bench.{tag}.chunks", "STATESWEEP_TABLE_NAMING": "seed",
           "STATESWEEP_LOG_FORMAT": "json"}
    settings = Settings.from_env(env)
    engine, tables = make_engine(PG + db), build_tables("seed")
    registry = registry_for(REDIS_URL, settings.key_prefix)
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    tdir = logs / f"{broker}-{case}-{n}"
    tdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"broker": broker, "case": case, "trial": n,
                           "load": os.getloadavg()[0]}
    expired_before = counts(engine, tables).expired
    dep: Deployment | None = None
    try:
        dep = Deployment.start(env, tdir)
        with ExitStack() as held, client(settings) as app:
            conn = engine.connect()
            held.callback(conn.close)
            trans = conn.begin()
            table = tables.task_state.name  # from schema.build_tables, never from input
            if case in ("chunk_worker", "beat"):
                # The chunk holding this expired mid-table row waits on it: the run is certainly
                # mid-flight, and the waiting session tells which worker runs that chunk.
                conn.execute(text(f"SELECT id FROM {table} WHERE id = :id FOR UPDATE"),  # noqa: S608
                             {"id": spec.rows // 2 + 1})
            app.send_task(COORDINATE, kwargs={"source": "adhoc"},
                          queue=settings.control_queue)
            run_id, victim = "", dep.beats[0]
            want = {"coordinator_planning": ("planning",),
                    "coordinator_sending": ("running", "finished")}.get(case, ("running",))

            def reached() -> bool:
                nonlocal run_id
                recent = registry.recent(1)
                run_id = recent[0].run_id if recent else ""
                return bool(recent) and recent[0].state in want

            # Planning lasts tens of milliseconds: poll fast, and kill the worker whose log says
            # it received the coordinator the moment the run is in the wanted state.
            wait(reached, 60, f"no run reached {want}", poll=0.001)
            if case == "chunk_worker":
                victim = owner_of_waiter(engine, dep.workers)
            elif case == "beat":
                owner_of_waiter(engine, dep.workers)
            else:
                victim = next(w for w in dep.workers
                              if "statesweep.coordinate[" in w.log())
            at_kill = window(r, settings.key_prefix, run_id)
            done_at_kill = (registry.get(run_id) or registry.recent(1)[0]).chunks_done
            victim.kill()
            killed = time.monotonic()
            state_at_kill = (registry.get(run_id) or registry.recent(1)[0]).state
            if trans.is_active:
                trans.rollback()
        out.update(run_id=run_id, victim=victim.name, window_at_kill=at_kill,
                   state_at_kill=state_at_kill,
                   unsent_at_kill=sum(1 for v in at_kill.values() if v == "c"),
                   chunks_done_at_kill=done_at_kill)

        def recovered() -> bool:
            if case == "beat":  # the beat's work: the pump, now from the standby
                return TOOK_OVER in dep.beats[1].log()
            rec = registry.get(run_id)
            if rec is None:
                return False
            if rec.state in ("finished", "failed"):
                return True
            if case == "coordinator_planning":
                return rec.chunks_done > 0
            now = window(r, settings.key_prefix, run_id)
            return not any(k in now for k in at_kill)

        # One poll for all three moments: the run's first progress after the kill (beat's
        # case: the run goes on without beat), recovery, and the run's end.
        seen: dict[str, float] = {}
        deadline = killed + 600
        while len(seen) < 3:
            if time.monotonic() > deadline:
                raise TimeoutError(f"after 600 s: {seen}")
            rec = registry.get(run_id)
            now = time.monotonic()
            if rec is not None and rec.chunks_done > done_at_kill:
                seen.setdefault("progress_s", now)
            if recovered():
                seen.setdefault("recovery_s", now)
            if rec is not None and rec.state in ("finished", "failed"):
                seen.setdefault("completion_s", now)
                seen.setdefault("progress_s", now)
            time.sleep(0.05)
        out.update({k: round(v - killed, 2) for k, v in seen.items()})
        rec = registry.get(run_id)
        assert rec is not None
        after = counts(engine, tables)
        out.update(state=rec.state, chunks_planned=rec.chunks_planned,
                   chunks_done=rec.chunks_done, rows_deleted=rec.rows_deleted,
                   expired_before=expired_before, expired_after=after.expired,
                   resends=int(r.hget(f"{settings.key_prefix}:run:{run_id}", "resends") or 0),
                   rows_exact=task_state_rows(engine, tables) == expected_survivors(spec))
        # The rows the run reports equal the rows deleted, unless a copy of a chunk committed
        # its DELETE and died before counting it (the resent copy then finds nothing).
        out["rows_counted_exactly"] = rec.rows_deleted == expired_before
        out["correct"] = (rec.state == "finished" and rec.chunks_done == rec.chunks_planned
                          and after.expired == 0 and out["rows_exact"])
    finally:
        if dep is not None:
            dep.stop()
        engine.dispose()
        for key in r.scan_iter(f"{settings.key_prefix}:*"):
            r.delete(key)
        r.close()
        if url.startswith("redis"):
            forget_queues(url, tag)
        admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    return out


def forget_queues(url: str, tag: str) -> None:
    """Drop this trial's queues, kombu's bindings of them, and the dead worker's messages in
    kombu's unacknowledged index (one per Redis database, shared by every queue on it), which
    would otherwise be restored into a queue nobody reads."""
    r = redis.Redis.from_url(url)
    try:
        for key in r.scan_iter(f"*bench.{tag}.*"):
            r.delete(key)
        for field, value in r.hscan_iter("unacked"):
            if f"bench.{tag}.".encode() in value:
                r.hdel("unacked", field)
                r.zrem("unacked_index", field)
    finally:
        r.close()


def summarise(trials: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in trials:
        out.setdefault(t["broker"], {}).setdefault(t["case"], []).append(t)
    summary: dict[str, Any] = {}
    for broker, cases in out.items():
        for case, ts in cases.items():
            rec = [t["recovery_s"] for t in ts if "recovery_s" in t]
            summary.setdefault(broker, {})[case] = {
                "trials": len(ts), "median_s": round(statistics.median(rec), 2) if rec else None,
                "max_s": max(rec) if rec else None,
                "completion_median_s": round(statistics.median(
                    t["completion_s"] for t in ts if "completion_s" in t), 2) if rec else None,
                "all_correct": all(t.get("correct") for t in ts),
                "rows_counted_exactly": sum(1 for t in ts if t.get("rows_counted_exactly",
                                                                  t.get("counted_once"))),
                "holds": bool(rec) and max(rec) <= TARGET_SECONDS,
                "errors": [t["error"] for t in ts if "error" in t]}
    return summary


def confirm_grace() -> int:
    """CONFIRM_GRACE of the run scripts: a chunk cut and not confirmed sent is resent after."""
    for value in vars(runs_lua).values():
        if isinstance(value, str) and "local CONFIRM_GRACE = " in value:
            return int(value.split("local CONFIRM_GRACE = ")[1].split()[0])
    return -1


def defaults() -> dict[str, Any]:
    s = Settings()
    return {"visibility_timeout": s.visibility_timeout, "lock_ttl_seconds": s.lock_ttl_seconds,
            "pump_interval_seconds": s.pump_interval_seconds,
            "chunk_time_limit": s.chunk_time_limit, "resend_after": resend_after(s),
            "chunk_heartbeat_ttl": BEAT_TTL_SECONDS, "beat_lock_ttl": BEAT_LOCK_TTL_SECONDS,
            "beat_standby_poll": STANDBY_POLL_SECONDS,
            "confirm_grace": confirm_grace(),
            "max_chunks_in_flight": s.max_chunks_in_flight,
            "cleanup_batch_size": s.cleanup_batch_size}


# What brings each case's work back, and the bound the defaults give it.
MECHANISM = {
    "chunk_worker": "the chunk's heartbeat lapses ({chunk_heartbeat_ttl} s) and the next pump "
                    "(every {pump_interval_seconds:g} s) or finishing chunk sends it again: "
                    "<= {chunk_bound:g} s + a worker picking it up; RabbitMQ also redelivers at "
                    "once, Redis after the visibility timeout ({visibility_timeout} s)",
    "coordinator_planning": "its planning heartbeat lapses ({chunk_heartbeat_ttl} s) and the "
                            "next pump (every {pump_interval_seconds:g} s) sends the "
                            "coordinator again with the run's id, and that copy plans: "
                            "<= {chunk_bound:g} s + pickup and a plan; RabbitMQ also "
                            "redelivers its own message as the connection closes (Redis only "
                            "after the visibility timeout, {visibility_timeout} s)",
    "coordinator_sending": "chunks cut and not confirmed published are sent again "
                           "{confirm_grace} s after the cut by the next pump (every "
                           "{pump_interval_seconds:g} s): <= {confirm_bound:g} s + pickup",
    "beat": "the run goes on without beat (finishing chunks top the window up); the standby "
            "takes the beat lock once it lapses ({beat_lock_ttl} s, renewed every "
            "{beat_renew:g} s, the standby tries every {beat_poll:g} s): "
            "<= {beat_bound:g} s; its first tick sends the overdue pump",
}


def markdown(result: dict[str, Any]) -> str:
    d = result["defaults"]
    bounds = {"chunk_bound": d["chunk_heartbeat_ttl"] + d["pump_interval_seconds"],
              "confirm_bound": d["confirm_grace"] + d["pump_interval_seconds"],
              "beat_renew": d["beat_lock_ttl"] / 4,
              "beat_poll": d.get("beat_standby_poll", d["beat_lock_ttl"] / 3),
              "beat_bound": d["beat_lock_ttl"] + d.get("beat_standby_poll",
                                                       d["beat_lock_ttl"] / 3)}
    lines = [
        "# Recovery after one process kill, default settings (issue 21: <= 15 s)", "",
        f"Command: `{result['command']}`  ", f"Load before: `{result['uptime_before']}`  ",
        f"Load after: `{result['uptime_after']}`  ",
        f"Rows: {result['rows']:,} ({result['expired_rows']:,} expired), default batch "
        f"{d['cleanup_batch_size']:,}, window {d['max_chunks_in_flight']}; three workers (-c 2) "
        "on both queues, a beat and a standby beat; 2 shared CPUs.  ",
        "Defaults: " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in d.items()), "",
        "Recovery: from the SIGKILL until every chunk that was in the window at the kill is "
        "counted (coordinator_planning: the first chunk counted; beat: the standby holds the "
        "beat lock). Completion: until the run finished. Correct: finished, every chunk counted "
        "once (chunks_done = chunks_planned), 0 expired rows left, the surviving rows exactly "
        "the seed's live ones. rows_deleted exact: the run's rows_deleted equals the expired "
        "rows.", "",
        "| broker | case | trials | recovery median s | recovery max s | completion median s "
        "| correct | rows_deleted exact | <= 15 s |", "|---|---|---|---|---|---|---|---|---|"]
    for broker, cases in summarise(result["trials"]).items():
        for case, c in cases.items():
            verdict = ("n/a" if c["max_s"] is None else "holds" if c["holds"]
                       else f"misses by {c['max_s'] - TARGET_SECONDS:.1f} s")
            lines.append(f"| {broker} | {case} | {c['trials']} | {c['median_s']} | {c['max_s']} "
                         f"| {c['completion_median_s']} | {'yes' if c['all_correct'] else 'NO'} "
                         f"| {c['rows_counted_exactly']}/{c['trials']} | {verdict} |")
    lines += ["", "## What brings the work back", ""]
    lines += [f"- **{case}**: " + text.format(**d, **bounds) for case, text in MECHANISM.items()]
    if result.get("notes"):  # what the person who ran it found, kept with the numbers
        lines += ["", "## Findings", ""] + [f"- {note}" for note in result["notes"]]
    lines += ["", "## Trials", "", "| broker | case | # | load | state at kill | unsent at kill "
              "| recovery s | progress s | completion s | resends | correct | rows_deleted |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in result["trials"]:
        if "error" in t:
            lines.append(f"| {t['broker']} | {t['case']} | {t['trial']} | | error: "
                         f"{t['error'][:120]} | | | | | | | |")
            continue
        lines.append(f"| {t['broker']} | {t['case']} | {t['trial']} | {t['load']:.1f} "
                     f"| {t['state_at_kill']} | {t['unsent_at_kill']} | {t['recovery_s']} "
                     f"| {t.get('progress_s', '')} | {t['completion_s']} | {t['resends']} "
                     f"| {'yes' if t['correct'] else 'NO'} | {t['rows_deleted']:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.recovery")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--brokers", default="redis,rabbitmq")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=str(OUT / "recovery"))
    # kombu keeps one index of unacknowledged messages per Redis database, whatever the queue:
    # any client on it restores them after its own visibility timeout (a test's 10 s), so a
    # shared Redis cuts the default 90 s short. A Redis of the bench's own measures the default.
    ap.add_argument("--redis-broker", default=REDIS_URL,
                    help="the Redis broker's URL (the run store stays on 6379)")
    ap.add_argument("--render", action="store_true",
                    help="only write <out>.md again from <out>.json")
    args = ap.parse_args(argv)
    if args.render:
        result = json.loads(Path(args.out + ".json").read_text())
        Path(args.out + ".md").write_text(markdown(result))
        return 0
    spec = SeedSpec(rows=args.rows)
    template = f"sw_rec_template_{uuid.uuid4().hex[:6]}"
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    admin(f'CREATE DATABASE "{template}"')
    logs = Path(f"/tmp/bench-recovery-{uuid.uuid4().hex[:6]}")
    trials: list[dict[str, Any]] = []
    try:
        seed_database(PG + template, spec, "seed")[0].dispose()
        for broker in args.brokers.split(","):
            with broker_url(broker, args.redis_broker) as url:
                for case in args.cases.split(","):
                    for n in range(1, args.trials + 1):
                        try:
                            t = trial(broker, url, case, template, spec, n, logs)
                        except Exception as exc:  # noqa: BLE001 - a failed trial is a result
                            t = {"broker": broker, "case": case, "trial": n,
                                 "error": f"{type(exc).__name__}: {exc}"[:500]}
                        trials.append(t)
                        print(json.dumps({k: v for k, v in t.items() if k != "window_at_kill"}),
                              file=sys.stderr, flush=True)
    finally:
        admin(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
    result = {"command": "python -m bench.recovery " + " ".join(argv or sys.argv[1:]),
              "uptime_before": uptime_before,
              "uptime_after": subprocess.run(["uptime"], capture_output=True,
                                             text=True).stdout.strip(),
              "rows": args.rows, "expired_rows": sum(1 for i in range(args.rows)
                                                     if i % spec.period < spec.expired_per_period),
              "defaults": defaults(), "target_s": TARGET_SECONDS, "logs": str(logs),
              "summary": summarise(trials), "trials": trials}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(result))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    raise SystemExit(main())
