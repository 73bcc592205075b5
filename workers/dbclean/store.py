"""A distributed db-clean run in the run store (Redis), beside the cleanup runs.

The run's record is an ordinary run record (``<prefix>:run:<id>``, kind ``db_clean``), listed in
``<prefix>:runs``: ``status`` shows it and ``abort`` ends it through the run store's own ABORT
step. What only db-clean needs lives under the run's own keys, each with a TTL from creation:

  <prefix>:dbclean:lock                 the active db-clean run's id (one at a time; TTL
                                        STATESWEEP_RUN_TIMEOUT_SECONDS, renewed by every step)
  <prefix>:run:<id>:dbclean             hash: request (JSON), version, tables (JSON, in order),
                                        tag (archive time), index (the table being cleaned),
                                        next (the last chunk number handed out)
  <prefix>:run:<id>:dbclean:t:<table>   hash: state (running | done | skipped), eligible,
                                        deleted, chunks, dependants, archive, skipped, failed,
                                        cursor (the next chunk's lo, a key) and cut (1: all cut),
                                        size (rows the last transaction was sized for),
                                        longest_ms and transactions (every transaction that
                                        deleted from it)
  <prefix>:run:<id>:dbclean:t:<table>:timings
                                        list: the table's last transactions, "planned|rows|
                                        seconds|lock_timeout", its next size's evidence
  <prefix>:run:<id>:dbclean:inflight    hash chunk -> "st|sent_at|resends|payload": the window;
                                        st s (sent) or t (taken: a worker began it, its
                                        heartbeat is <prefix>:run:<id>:beat:<chunk>)
  <prefix>:run:<id>:dbclean:step        the step mutex (PX), and …:again, a step was asked for

A chunk is counted once: FINISH removes it from the window and adds its rows in one step; a
copy that finds it gone (a resent duplicate) adds nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from typing import Any

from workers.metrics import metrics_key
from workers.runs import BEAT_TTL_SECONDS, RUN_RETENTION_SECONDS, RunStore

KIND = "db_clean"
STEP_TTL_MS = 60_000

# KEYS lock run meta runs holder_run; ARGV run_id now ttl retention source before batch request
# version tables tag holder -> {'started'} | {'running'} (its own run, resumed) | {'held',
# holder} | {'ended', state} | {'retry'}. A lock naming a run that ended (aborted) passes on.
START = r"""
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  if holder ~= ARGV[12] then return {'retry', ''} end
  if redis.call('HGET', KEYS[5], 'state') == 'running' then return {'held', holder} end
end
local state = redis.call('HGET', KEYS[2], 'state')
if state == 'running' then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
  return {'running', ''}
end
if state and state ~= 'queued' and state ~= '' then return {'ended', state} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('HSET', KEYS[2], 'run_id', ARGV[1], 'state', 'running', 'kind', 'db_clean',
  'planner', 'db-clean', 'source', ARGV[5], 'cutoff', ARGV[6], 'batch_size', ARGV[7],
  'started_at', ARGV[2], 'planned_at', ARGV[2], 'window_started_at', ARGV[2],
  'rows_deleted', 0, 'chunks_done', 0, 'chunks_failed', 0, 'planning_done', 0, 'error', '')
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[3], 'request', ARGV[8], 'version', ARGV[9], 'tables', ARGV[10],
  'tag', ARGV[11], 'index', 0, 'next', 0)
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
return {'started', ''}
"""

# KEYS run inflight beat; ARGV chunk payload ttl -> ok | ended | duplicate | forged
BEGIN = r"""
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 'ended' end
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return 'duplicate' end
local st, sent, n, payload = string.match(v, '^(%a)|([^|]*)|(%d+)|(.*)$')
if payload ~= ARGV[2] then return 'forged' end
redis.call('HSET', KEYS[2], ARGV[1], 't|' .. sent .. '|' .. n .. '|' .. payload)
redis.call('SET', KEYS[3], '1', 'EX', ARGV[3])
return 'ok'
"""

# KEYS inflight run; ARGV chunk now error: a chunk waiting for its retry is sent, not running
REQUEUE = r"""
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local st, sent, n, payload = string.match(v, '^(%a)|([^|]*)|(%d+)|(.*)$')
redis.call('HSET', KEYS[1], ARGV[1], 's|' .. ARGV[2] .. '|' .. n .. '|' .. payload)
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'retry_error', ARGV[3], 'retry_at', ARGV[2])
  redis.call('HINCRBY', KEYS[2], 'retries', 1)
end
return 1
"""

# KEYS table timings; ARGV entry ms keep ttl evidence size: one transaction of a table, kept
# among its last *keep* when it is evidence of its rows' speed; the table's longest, its count
# of transactions and the size of the last.
NOTE = r"""
if ARGV[5] == '1' then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
redis.call('HSET', KEYS[1], 'size', ARGV[6])
if tonumber(ARGV[2]) > tonumber(redis.call('HGET', KEYS[1], 'longest_ms') or '0') then
  redis.call('HSET', KEYS[1], 'longest_ms', ARGV[2])
end
redis.call('HINCRBY', KEYS[1], 'transactions', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS run inflight table metrics beat; ARGV chunk rows dependants error table now
# -> 1 counted, 0 counted before (or the run ended)
FINISH = r"""
redis.call('DEL', KEYS[5])
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
if ARGV[4] ~= '' then
  redis.call('HINCRBY', KEYS[1], 'chunks_failed', 1)
  redis.call('HSETNX', KEYS[3], 'failed', ARGV[4])
  redis.call('HINCRBY', KEYS[4], 'db_clean_chunks_failed', 1)
  return 1
end
redis.call('HINCRBY', KEYS[1], 'rows_deleted', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'chunks_done', 1)
redis.call('HSET', KEYS[1], 'last_progress_at', ARGV[6])
redis.call('HINCRBY', KEYS[3], 'deleted', ARGV[2])
redis.call('HINCRBY', KEYS[3], 'chunks', 1)
redis.call('HINCRBY', KEYS[3], 'dependants', ARGV[3])
redis.call('HINCRBY', KEYS[4], 'db_clean_rows_deleted:' .. ARGV[5], ARGV[2])
redis.call('HINCRBY', KEYS[4], 'db_clean_chunks_done', 1)
return 1
"""

# KEYS run lock inflight; ARGV run_id state now error: end a running run, free its lock
END = r"""
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('DEL', KEYS[3])
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'finished_at', ARGV[3], 'error', ARGV[4],
  'held', '', 'planning_done', 1)
return 1
"""

# KEYS key; ARGV token: delete the key if it still holds the token
RELEASE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def encode_key(key: tuple[Any, ...] | None) -> str | None:
    """A primary key (a chunk bound) as JSON text; UUIDs and times keep their type."""
    if key is None:
        return None

    def one(v: Any) -> Any:
        if isinstance(v, uuid.UUID):
            return {"u": str(v)}
        if isinstance(v, dt.datetime):
            return {"t": v.isoformat()}
        return v
    return json.dumps([one(v) for v in key])


def decode_key(text: str | None) -> tuple[Any, ...] | None:
    if text is None or text == "":
        return None

    def one(v: Any) -> Any:
        if isinstance(v, dict) and "u" in v:
            return uuid.UUID(v["u"])
        if isinstance(v, dict) and "t" in v:
            return dt.datetime.fromisoformat(v["t"])
        return v
    return tuple(one(v) for v in json.loads(text))


def payload(table: str, lo: str | None, hi: str | None) -> str:
    """What a chunk message carries, as its window entry keeps it (a message must match)."""
    return json.dumps([table, lo, hi])


class DbCleanStore:
    """The db-clean keys of one run store."""

    def __init__(self, registry: RunStore) -> None:
        self.registry = registry
        self.client = registry.client
        self._scripts = {name: self.client.register_script(src) for name, src in (
            ("START", START), ("BEGIN", BEGIN), ("REQUEUE", REQUEUE), ("FINISH", FINISH),
            ("END", END), ("RELEASE", RELEASE), ("NOTE", NOTE))}

    def k(self, *parts: str) -> str:
        return ":".join((self.registry.prefix, *parts))

    def lock_key(self) -> str:
        return self.k("dbclean", "lock")

    def run_key(self, run_id: str) -> str:
        return self.k("run", run_id)

    def meta_key(self, run_id: str) -> str:
        return self.k("run", run_id, "dbclean")

    def inflight_key(self, run_id: str) -> str:
        return self.k("run", run_id, "dbclean", "inflight")

    def table_key(self, run_id: str, table: str) -> str:
        return self.k("run", run_id, "dbclean", "t", table)

    def beat_key(self, run_id: str, chunk: int | str) -> str:
        return self.k("run", run_id, "beat", str(chunk))

    # --- the run ------------------------------------------------------------------------------

    def active_run(self) -> str | None:
        v = self.client.get(self.lock_key())
        return str(v) if v else None

    def start(self, run_id: str, *, ttl: int, source: str, before: str, batch_size: int,
              request: str, version: str, tables: list[str], tag: str) -> tuple[str, str]:
        for _ in range(5):
            holder = self.active_run() or run_id
            r = self._scripts["START"](
                keys=[self.lock_key(), self.run_key(run_id), self.meta_key(run_id),
                      self.k("runs"), self.run_key(holder)],
                args=[run_id, time.time(), ttl, RUN_RETENTION_SECONDS, source, before,
                      batch_size, request, version, json.dumps(tables), tag, holder])
            if r[0] != "retry":
                return str(r[0]), str(r[1])
        return "held", self.active_run() or ""

    def meta(self, run_id: str) -> dict[str, str]:
        return dict(self.client.hgetall(self.meta_key(run_id)))

    def renew(self, run_id: str, ttl: int) -> bool:
        """Keep the lock while the run lives; False if another run holds it now."""
        key = self.lock_key()
        if self.client.set(key, run_id, nx=True, ex=ttl):
            return True
        if self.client.get(key) != run_id:
            return False
        self.client.expire(key, ttl)
        return True

    def end(self, run_id: str, state: str, error: str = "") -> bool:
        return bool(self._scripts["END"](
            keys=[self.run_key(run_id), self.lock_key(), self.inflight_key(run_id)],
            args=[run_id, state, time.time(), error[:500]]))

    # --- tables -------------------------------------------------------------------------------

    def table(self, run_id: str, table: str) -> dict[str, str]:
        return dict(self.client.hgetall(self.table_key(run_id, table)))

    def set_table(self, run_id: str, table: str, **values: Any) -> None:
        key = self.table_key(run_id, table)
        pipe = self.client.pipeline()
        pipe.hset(key, mapping={k: "" if v is None else str(v) for k, v in values.items()})
        pipe.expire(key, RUN_RETENTION_SECONDS)
        pipe.execute()

    def tables(self, run_id: str) -> list[dict[str, Any]]:
        """Each table's report, in the run's order (the local run's TableResult fields)."""
        names = json.loads(self.meta(run_id).get("tables") or "[]")
        out = []
        for name in names:
            h = self.table(run_id, name)
            out.append({"table": name, "state": h.get("state", ""),
                        "eligible": int(h.get("eligible") or 0),
                        "deleted": int(h.get("deleted") or 0),
                        "chunks": int(h.get("chunks") or 0),
                        "archive": h.get("archive") or None, "skipped": h.get("skipped", ""),
                        "failed": h.get("failed", ""),
                        "dependants": int(h.get("dependants") or 0),
                        "longest_transaction_ms": float(h.get("longest_ms") or 0),
                        "transactions": int(h.get("transactions") or 0),
                        "size": int(h.get("size") or 0)})
        return out

    # --- chunk size from time -----------------------------------------------------------------

    def note_timing(self, run_id: str, table: str, planned: int, rows: int, seconds: float,
                    lock_timeout: bool, keep: int, evidence: bool = True) -> None:
        """One transaction that deleted from *table*, whichever worker ran it: kept among its
        last *keep* when it is *evidence* of the rows' speed; its longest (what ``status``
        shows) either way."""
        key = self.table_key(run_id, table)
        self._scripts["NOTE"](
            keys=[key, key + ":timings"],
            args=[f"{planned}|{rows}|{seconds:.6f}|{int(lock_timeout)}",
                  round(seconds * 1000, 1), keep, RUN_RETENTION_SECONDS, int(evidence),
                  planned])

    def timings(self, run_id: str, table: str) -> list[tuple[int, int, float, bool]]:
        """(planned, rows, seconds, lock_timeout) of the table's last transactions, oldest
        first."""
        out = []
        for v in self.client.lrange(self.table_key(run_id, table) + ":timings", 0, -1):
            planned, rows, seconds, lock_timeout = str(v).split("|")
            out.append((int(planned), int(rows), float(seconds), lock_timeout == "1"))
        return out

    # --- the window ---------------------------------------------------------------------------

    def next_number(self, run_id: str) -> int:
        return int(self.client.hincrby(self.meta_key(run_id), "next", 1))

    def put(self, run_id: str, chunk: int, body: str, resends: int = 0) -> None:
        key = self.inflight_key(run_id)
        pipe = self.client.pipeline()
        pipe.hset(key, str(chunk), f"s|{time.time()}|{resends}|{body}")
        pipe.expire(key, RUN_RETENTION_SECONDS)
        pipe.execute()

    def window(self, run_id: str) -> list[tuple[int, str, float, int, str]]:
        """(chunk, st, sent_at, resends, payload) of each chunk in flight."""
        out = []
        for n, v in self.client.hgetall(self.inflight_key(run_id)).items():
            st, sent, resends, body = v.split("|", 3)
            out.append((int(n), st, float(sent), int(resends), body))
        return sorted(out)

    def alive(self, run_id: str, chunk: int) -> bool:
        return bool(self.client.exists(self.beat_key(run_id, chunk)))

    def begin(self, run_id: str, chunk: int, body: str) -> str:
        return str(self._scripts["BEGIN"](
            keys=[self.run_key(run_id), self.inflight_key(run_id), self.beat_key(run_id, chunk)],
            args=[chunk, body, BEAT_TTL_SECONDS]))

    def requeue(self, run_id: str, chunk: int, error: str) -> None:
        self._scripts["REQUEUE"](keys=[self.inflight_key(run_id), self.run_key(run_id)],
                                 args=[chunk, time.time(), error[:200]])

    def finish(self, run_id: str, chunk: int, table: str, rows: int, dependants: int,
               error: str = "") -> bool:
        return bool(self._scripts["FINISH"](
            keys=[self.run_key(run_id), self.inflight_key(run_id), self.table_key(run_id, table),
                  metrics_key(self.registry.prefix), self.beat_key(run_id, chunk)],
            args=[chunk, rows, dependants, error[:500], table, time.time()]))

    # --- the step mutex -----------------------------------------------------------------------

    def try_step(self, run_id: str) -> str | None:
        token = uuid.uuid4().hex
        ok = self.client.set(self.k("run", run_id, "dbclean", "step"), token, nx=True,
                             px=STEP_TTL_MS)
        return token if ok else None

    def end_step(self, run_id: str, token: str) -> None:
        self._scripts["RELEASE"](keys=[self.k("run", run_id, "dbclean", "step")], args=[token])

    def ask_step(self, run_id: str) -> None:
        self.client.set(self.k("run", run_id, "dbclean", "again"), "1", ex=60)

    def take_ask(self, run_id: str) -> bool:
        return bool(self.client.delete(self.k("run", run_id, "dbclean", "again")))
