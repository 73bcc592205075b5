"""Where cleanup runs are recorded and the single-flight lock lives.

Redis in every real deployment, so the CLI, Flower users and every worker see the same runs. An
in-process store serves the zero-service demo, where coordinator and worker share one process.

Keys (``<prefix>`` from STATESWEEP_KEY_PREFIX):
  <prefix>:lock             owner token = the active run id; TTL renewed while planning and on
                            every finished chunk, deleted when the run finishes; a run whose
                            chunks all vanished frees the lock when the TTL runs out.
  <prefix>:run:<id>         hash: state, cutoff, chunks planned/done, rows, times.
  <prefix>:run:<id>:done    set of chunk numbers already counted (redelivery counts once).
  <prefix>:run:<id>:chunks  hash chunk number -> "lo:hi", so a stalled run's missing chunks
                            can be sent again (a message the broker lost is not redelivered).
  <prefix>:runs             sorted set of run ids by start time, for `status`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from workers import metrics

RUN_RETENTION_SECONDS = 7 * 24 * 3600
RECENT_RUNS_KEPT = 200


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    state: str  # planning | running | finished | failed
    cutoff: str = ""
    batch_size: int = 0
    source: str = ""
    chunks_planned: int = 0
    chunks_done: int = 0
    expected_rows: int = 0
    rows_deleted: int = 0
    chunks_failed: int = 0
    planning_done: bool = False
    started_at: float = 0.0
    planned_at: float = 0.0
    last_progress_at: float = 0.0
    finished_at: float = 0.0
    error: str = ""

    @property
    def duration(self) -> float:
        end = self.finished_at or time.time()
        return max(0.0, end - self.started_at) if self.started_at else 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows_deleted / self.duration if self.duration > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["duration"] = round(self.duration, 3)
        d["rows_per_second"] = round(self.rows_per_second, 1)
        return d

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> RunRecord:
        ints = ("batch_size", "chunks_planned", "chunks_done", "expected_rows", "rows_deleted",
                "chunks_failed")
        floats = ("started_at", "planned_at", "finished_at", "last_progress_at")
        kw: dict[str, Any] = {}
        for k in cls.__dataclass_fields__:
            if k not in h:
                continue
            v = h[k]
            kw[k] = int(v) if k in ints else float(v) if k in floats else (
                v == "1" if k == "planning_done" else v)
        return cls(**kw)


class RunRegistry(Protocol):
    def acquire(self, run_id: str, ttl: int) -> str | None:
        """Take the lock for *run_id*; None on success, else the run id that holds it."""

    def renew(self, run_id: str, ttl: int) -> bool: ...
    def release(self, run_id: str) -> None: ...
    def active_run(self) -> str | None: ...
    def start(self, run_id: str, *, cutoff: str, batch_size: int, source: str) -> None: ...
    def add_chunk(self, run_id: str, expected: int,
                  chunk: tuple[int, int, int] | None = None) -> None:
        """Count a planned chunk; with (number, lo, hi), remember its range for a resume."""

    def missing_chunks(self, run_id: str) -> list[tuple[int, int, int]]:
        """(number, lo, hi) of every remembered chunk of the run not yet counted done."""

    def note_progress(self, run_id: str, at: float) -> None: ...
    def finish_planning(self, run_id: str) -> RunRecord | None:
        """Mark planning done; returns the record if this call finished the run."""

    def chunk_done(self, run_id: str, chunk: int, rows: int, lock_ttl: int, *,
                   seconds: float | None = None,
                   table: str = "task_state") -> tuple[bool, RunRecord | None]:
        """Count a chunk once (and its metrics: *table*'s rows, *seconds* it took). Returns
        (counted, record-if-this-call-finished-the-run)."""

    def chunk_failed(self, run_id: str, chunk: int, error: str) -> RunRecord | None:
        """Count a chunk that failed for good; returns the record if this ended the run."""

    def fail(self, run_id: str, error: str) -> None: ...
    def get(self, run_id: str) -> RunRecord | None: ...
    def recent(self, limit: int = 10) -> list[RunRecord]: ...


# Both scripts run atomically in Redis: the run finishes exactly once, whichever of the
# coordinator (planning done last) and a chunk (done last) gets there second.
_FINISH_IF_COMPLETE = """
local function finish_if_complete(run, lock, run_id, now)
  local h = redis.call('HMGET', run, 'planning_done', 'chunks_planned', 'chunks_done', 'state')
  if h[1] == '1' and tonumber(h[3]) >= tonumber(h[2]) and h[4] ~= 'finished'
      and h[4] ~= 'failed' then
    -- A run with a chunk that failed for good ends 'failed': its rows wait for the next run.
    local final = 'finished'
    if tonumber(redis.call('HGET', run, 'chunks_failed') or '0') > 0 then final = 'failed' end
    redis.call('HSET', run, 'state', final, 'finished_at', now)
    if redis.call('GET', lock) == run_id then redis.call('DEL', lock) end
    return 1
  end
  return 0
end
"""

# Counts a chunk once, whether it deleted its rows (err '') or failed for good (err set).
_COUNT_CHUNK = _FINISH_IF_COMPLETE + metrics.COUNT_METRICS_LUA + """
local run, done, lock, mkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local run_id, chunk, rows, now, ttl, keep, err, seconds, table_name =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
if redis.call('EXISTS', run) == 0 then return {-1, 0} end
if redis.call('SADD', done, chunk) == 0 then return {0, 0} end
count_metrics(mkey, table_name, rows, seconds, err ~= '')
redis.call('EXPIRE', done, keep)
redis.call('HINCRBY', run, 'chunks_done', 1)
if err ~= '' then
  redis.call('HINCRBY', run, 'chunks_failed', 1)
  redis.call('HSET', run, 'error', err)
  return {1, finish_if_complete(run, lock, run_id, now)}
end
redis.call('HINCRBY', run, 'rows_deleted', rows)
redis.call('HSET', run, 'last_progress_at', now)
-- Only a planned run's chunks extend the lock (to the run timeout). While planning, the
-- coordinator renews it with the short lock TTL, so a coordinator killed mid-plan frees it soon.
if redis.call('GET', lock) == run_id and redis.call('HGET', run, 'planning_done') == '1' then
  redis.call('EXPIRE', lock, ttl)
end
return {1, finish_if_complete(run, lock, run_id, now)}
"""

_FINISH_PLANNING = _FINISH_IF_COMPLETE + """
local run, lock = KEYS[1], KEYS[2]
local run_id, now = ARGV[1], ARGV[2]
redis.call('HSET', run, 'planning_done', '1', 'planned_at', now, 'state', 'running')
return finish_if_complete(run, lock, run_id, now)
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisRunRegistry:
    def __init__(self, url: str, prefix: str = "statesweep") -> None:
        import redis

        self.client = redis.Redis.from_url(url, decode_responses=True,
                                           socket_connect_timeout=5, socket_timeout=10,
                                           health_check_interval=30)
        self.prefix = prefix
        self._count_chunk = self.client.register_script(_COUNT_CHUNK)
        self._finish_planning = self.client.register_script(_FINISH_PLANNING)
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def acquire(self, run_id: str, ttl: int) -> str | None:
        for _ in range(3):
            if self.client.set(self._k("lock"), run_id, nx=True, ex=ttl):
                return None
            holder = self.client.get(self._k("lock"))
            if holder:
                return str(holder)
            # The holder released between our SET and GET: the lock is free, try again.
        return "unknown"

    def renew(self, run_id: str, ttl: int) -> bool:
        return bool(self._renew(keys=[self._k("lock")], args=[run_id, ttl]))

    def release(self, run_id: str) -> None:
        self._release(keys=[self._k("lock")], args=[run_id])

    def active_run(self) -> str | None:
        v = self.client.get(self._k("lock"))
        return str(v) if v else None

    def start(self, run_id: str, *, cutoff: str, batch_size: int, source: str) -> None:
        key = self._k("run", run_id)
        now = time.time()
        pipe = self.client.pipeline()
        pipe.hset(key, mapping={
            "run_id": run_id, "state": "planning", "cutoff": cutoff, "batch_size": batch_size,
            "source": source, "chunks_planned": 0, "chunks_done": 0, "expected_rows": 0,
            "rows_deleted": 0, "planning_done": "0", "started_at": now,
        })
        pipe.expire(key, RUN_RETENTION_SECONDS)
        pipe.zadd(self._k("runs"), {run_id: now})
        pipe.zremrangebyrank(self._k("runs"), 0, -RECENT_RUNS_KEPT - 1)
        pipe.execute()

    def add_chunk(self, run_id: str, expected: int,
                  chunk: tuple[int, int, int] | None = None) -> None:
        key = self._k("run", run_id)
        pipe = self.client.pipeline()
        pipe.hincrby(key, "chunks_planned", 1)
        pipe.hincrby(key, "expected_rows", expected)
        if chunk is not None:
            number, lo, hi = chunk
            pipe.hset(self._k("run", run_id, "chunks"), str(number), f"{lo}:{hi}")
            pipe.expire(self._k("run", run_id, "chunks"), RUN_RETENTION_SECONDS)
        pipe.execute()

    def missing_chunks(self, run_id: str) -> list[tuple[int, int, int]]:
        ranges: dict[str, str] = self.client.hgetall(  # type: ignore[assignment]
            self._k("run", run_id, "chunks"))
        done: set[str] = self.client.smembers(  # type: ignore[assignment]
            self._k("run", run_id, "done"))
        return sorted((int(n), *map(int, r.split(":"))) for n, r in ranges.items()  # type: ignore[misc]
                      if n not in done)

    def note_progress(self, run_id: str, at: float) -> None:
        self.client.hset(self._k("run", run_id), "last_progress_at", at)

    def finish_planning(self, run_id: str) -> RunRecord | None:
        finished = self._finish_planning(keys=[self._k("run", run_id), self._k("lock")],
                                         args=[run_id, time.time()])
        return self.get(run_id) if finished else None

    def _count(self, run_id: str, chunk: int, rows: int, lock_ttl: int, error: str,
               seconds: float | None = None,
               table: str = "task_state") -> tuple[bool, RunRecord | None]:
        counted, finished = self._count_chunk(
            keys=[self._k("run", run_id), self._k("run", run_id, "done"), self._k("lock"),
                  metrics.metrics_key(self.prefix)],
            args=[run_id, chunk, rows, time.time(), lock_ttl, RUN_RETENTION_SECONDS, error,
                  "" if seconds is None else seconds, table],
        )
        return counted == 1, (self.get(run_id) if finished else None)

    def chunk_done(self, run_id: str, chunk: int, rows: int, lock_ttl: int, *,
                   seconds: float | None = None,
                   table: str = "task_state") -> tuple[bool, RunRecord | None]:
        return self._count(run_id, chunk, rows, lock_ttl, "", seconds, table)

    def chunk_failed(self, run_id: str, chunk: int, error: str) -> RunRecord | None:
        """Count a chunk that failed for good as done-but-failed; returns the record if this
        call ended the run (then in state 'failed')."""
        return self._count(run_id, chunk, 0, 0, error[:500] or "chunk failed")[1]

    def fail(self, run_id: str, error: str) -> None:
        key = self._k("run", run_id)
        pipe = self.client.pipeline()
        # run_id too: a run can fail before start() wrote its hash (the database was down).
        pipe.hset(key, mapping={"run_id": run_id, "state": "failed", "error": error[:500],
                                "finished_at": time.time()})
        pipe.expire(key, RUN_RETENTION_SECONDS)
        pipe.execute()
        self.release(run_id)

    def get(self, run_id: str) -> RunRecord | None:
        h: dict[str, str] = self.client.hgetall(self._k("run", run_id))  # type: ignore[assignment]
        return RunRecord.from_hash(h) if h else None

    def recent(self, limit: int = 10) -> list[RunRecord]:
        ids: list[str] = self.client.zrevrange(self._k("runs"), 0, limit - 1)  # type: ignore[assignment]
        return [r for r in (self.get(i) for i in ids) if r is not None]


@dataclass
class _MemRun:
    record: dict[str, Any]
    done: set[int] = field(default_factory=set)
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)


class MemoryRunRegistry:
    """The same contract in one process (the demo's in-process worker); not shared across hosts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: tuple[str, float] | None = None
        self._runs: dict[str, _MemRun] = {}
        self.metrics = metrics.MemoryCounters()

    def _holder(self) -> str | None:
        if self._owner and self._owner[1] > time.monotonic():
            return self._owner[0]
        return None

    def acquire(self, run_id: str, ttl: int) -> str | None:
        with self._lock:
            holder = self._holder()
            if holder is not None:
                return holder
            self._owner = (run_id, time.monotonic() + ttl)
            return None

    def renew(self, run_id: str, ttl: int) -> bool:
        with self._lock:
            if self._holder() == run_id:
                self._owner = (run_id, time.monotonic() + ttl)
                return True
            return False

    def release(self, run_id: str) -> None:
        with self._lock:
            if self._holder() == run_id:
                self._owner = None

    def active_run(self) -> str | None:
        with self._lock:
            return self._holder()

    def start(self, run_id: str, *, cutoff: str, batch_size: int, source: str) -> None:
        with self._lock:
            self._runs[run_id] = _MemRun({
                "run_id": run_id, "state": "planning", "cutoff": cutoff,
                "batch_size": batch_size, "source": source, "started_at": time.time()})

    def add_chunk(self, run_id: str, expected: int,
                  chunk: tuple[int, int, int] | None = None) -> None:
        with self._lock:
            run = self._runs[run_id]
            r = run.record
            r["chunks_planned"] = r.get("chunks_planned", 0) + 1
            r["expected_rows"] = r.get("expected_rows", 0) + expected
            if chunk is not None:
                run.ranges[chunk[0]] = (chunk[1], chunk[2])

    def missing_chunks(self, run_id: str) -> list[tuple[int, int, int]]:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return []
            return sorted((n, lo, hi) for n, (lo, hi) in run.ranges.items()
                          if n not in run.done)

    def note_progress(self, run_id: str, at: float) -> None:
        with self._lock:
            if run_id in self._runs:
                self._runs[run_id].record["last_progress_at"] = at

    def _finish_if_complete(self, run_id: str) -> RunRecord | None:
        r = self._runs[run_id].record
        if (r.get("planning_done") and r.get("chunks_done", 0) >= r.get("chunks_planned", 0)
                and r["state"] not in ("finished", "failed")):
            final = "failed" if r.get("chunks_failed", 0) else "finished"
            r.update(state=final, finished_at=time.time())
            if self._holder() == run_id:
                self._owner = None
            return RunRecord(**r)
        return None

    def finish_planning(self, run_id: str) -> RunRecord | None:
        with self._lock:
            self._runs[run_id].record.update(planning_done=True, planned_at=time.time(),
                                             state="running")
            return self._finish_if_complete(run_id)

    def _count(self, run_id: str, chunk: int) -> dict[str, Any] | None:
        """Mark *chunk* done once (caller holds the lock); its run's record, or None if the run
        is unknown or the chunk was already counted."""
        run = self._runs.get(run_id)
        if run is None or chunk in run.done:
            return None
        run.done.add(chunk)
        run.record["chunks_done"] = run.record.get("chunks_done", 0) + 1
        return run.record

    def chunk_done(self, run_id: str, chunk: int, rows: int, lock_ttl: int, *,
                   seconds: float | None = None,
                   table: str = "task_state") -> tuple[bool, RunRecord | None]:
        with self._lock:
            r = self._count(run_id, chunk)
            if r is None:
                return False, None
            self.metrics.count_chunk(table, rows, seconds, failed=False)
            r["rows_deleted"] = r.get("rows_deleted", 0) + rows
            r["last_progress_at"] = time.time()
            if self._holder() == run_id and r.get("planning_done"):
                self._owner = (run_id, time.monotonic() + lock_ttl)
            return True, self._finish_if_complete(run_id)

    def chunk_failed(self, run_id: str, chunk: int, error: str) -> RunRecord | None:
        with self._lock:
            r = self._count(run_id, chunk)
            if r is None:
                return None
            self.metrics.count_chunk("", 0, None, failed=True)
            r["chunks_failed"] = r.get("chunks_failed", 0) + 1
            r["error"] = error[:500]
            return self._finish_if_complete(run_id)

    def fail(self, run_id: str, error: str) -> None:
        with self._lock:
            now = time.time()
            run = self._runs.setdefault(run_id, _MemRun({"run_id": run_id, "started_at": now}))
            run.record.update(state="failed", error=error[:500], finished_at=now)
            if self._holder() == run_id:
                self._owner = None

    def get(self, run_id: str) -> RunRecord | None:
        with self._lock:
            run = self._runs.get(run_id)
            return RunRecord(**run.record) if run else None

    def recent(self, limit: int = 10) -> list[RunRecord]:
        with self._lock:
            runs = sorted(self._runs.values(), key=lambda r: r.record["started_at"], reverse=True)
            return [RunRecord(**r.record) for r in runs[:limit]]


_memory_registries: dict[str, MemoryRunRegistry] = {}
_redis_registries: dict[tuple[str, str], RedisRunRegistry] = {}


def registry_for(url: str, prefix: str) -> RunRegistry:
    """The registry for a run-store URL: ``memory://`` (one per prefix, per process) or Redis."""
    if url.startswith("memory://"):
        return _memory_registries.setdefault(prefix, MemoryRunRegistry())
    key = (url, prefix)
    if key not in _redis_registries:
        _redis_registries[key] = RedisRunRegistry(url, prefix)
    return _redis_registries[key]
