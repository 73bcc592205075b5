"""Cleanup counters kept in the run store, so every worker on every host adds to one total.

The chunk counters are bumped inside the run store's own "count this chunk once" Lua script
(workers.runs), by the function in COUNT_METRICS_LUA spliced into it: a chunk redelivered or
retried after it was counted adds nothing, and progress and metrics can never disagree. The
exporter (workers.exporter) reads them at scrape time with read_counters().

Key (``<prefix>`` from STATESWEEP_KEY_PREFIX), one hash that never expires:
  <prefix>:metrics   rows_deleted:<table>          rows deleted, by table
                     chunks_done / chunks_failed   chunks counted once, by outcome
                     chunks_retried                retries of a chunk task (each attempt)
                     chunk_seconds_bucket:<le>     cumulative histogram of chunk durations
                     chunk_seconds_sum / _count
                     db_clean_rows_deleted:<table>  db-clean's rows moved (workers.dbclean.store)
                     db_clean_chunks_done / db_clean_chunks_failed
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The exporter's port: in the Prometheus exporters' range (9100-9999), not a well-known one.
#: Here, not in workers.exporter, so the CLI can show it without importing prometheus_client.
EXPORTER_PORT = 9808


def _log() -> Any:
    # structlog (and the asyncio it imports) only when a count fails: the CLI imports this
    # module through the run store, and its start-up is most of an empty `cleanup --wait`.
    import structlog

    return structlog.get_logger("statesweep.metrics")

# Chunk durations: Prometheus's default buckets, stretched to the chunk hard limit (300 s).
CHUNK_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                         60.0, 120.0, 300.0)
INF = "+Inf"


def metrics_key(prefix: str) -> str:
    return f"{prefix}:metrics"


def _le(bound: float) -> str:
    return repr(float(bound))


_LUA_BUCKETS = "{" + ", ".join(f"'{_le(b)}'" for b in CHUNK_SECONDS_BUCKETS) + "}"

# One self-contained Lua function, concatenated into the script that counts a chunk once and
# called right after that script's SADD succeeded. *failed* is a Lua boolean; *seconds* may be
# '' when the caller did not time the chunk (then no histogram sample is taken).
COUNT_METRICS_LUA = """
local function count_metrics(mkey, table_name, rows, seconds, failed)
  if failed then
    redis.call('HINCRBY', mkey, 'chunks_failed', 1)
    return
  end
  redis.call('HINCRBY', mkey, 'chunks_done', 1)
  redis.call('HINCRBY', mkey, 'rows_deleted:' .. table_name, tonumber(rows) or 0)
  local s = tonumber(seconds)
  if s == nil then return end
  for _, le in ipairs(__BUCKETS__) do
    if s <= tonumber(le) then redis.call('HINCRBY', mkey, 'chunk_seconds_bucket:' .. le, 1) end
  end
  redis.call('HINCRBY', mkey, 'chunk_seconds_bucket:+Inf', 1)
  redis.call('HINCRBYFLOAT', mkey, 'chunk_seconds_sum', s)
  redis.call('HINCRBY', mkey, 'chunk_seconds_count', 1)
end
""".replace("__BUCKETS__", _LUA_BUCKETS)


@dataclass
class Counters:
    """What the exporter shows, as read from the run store."""

    rows_deleted: dict[str, int] = field(default_factory=dict)
    chunks_done: int = 0
    chunks_failed: int = 0
    chunks_retried: int = 0
    # (le, cumulative count) in bucket order, ending with +Inf.
    chunk_seconds_buckets: list[tuple[str, int]] = field(default_factory=list)
    chunk_seconds_sum: float = 0.0
    chunk_seconds_count: int = 0
    # db-clean's own (workers.dbclean.store counts them once, in its FINISH step).
    db_clean_rows_deleted: dict[str, int] = field(default_factory=dict)
    db_clean_chunks_done: int = 0
    db_clean_chunks_failed: int = 0

    @classmethod
    def from_hash(cls, h: Mapping[str, str]) -> Counters:
        les = [_le(b) for b in CHUNK_SECONDS_BUCKETS] + [INF]
        return cls(
            rows_deleted={k.partition(":")[2]: int(v) for k, v in h.items()
                          if k.startswith("rows_deleted:")},
            chunks_done=int(h.get("chunks_done", 0)),
            chunks_failed=int(h.get("chunks_failed", 0)),
            chunks_retried=int(h.get("chunks_retried", 0)),
            chunk_seconds_buckets=[(le, int(h.get(f"chunk_seconds_bucket:{le}", 0)))
                                   for le in les],
            chunk_seconds_sum=float(h.get("chunk_seconds_sum", 0.0)),
            chunk_seconds_count=int(h.get("chunk_seconds_count", 0)),
            db_clean_rows_deleted={k.partition(":")[2]: int(v) for k, v in h.items()
                                   if k.startswith("db_clean_rows_deleted:")},
            db_clean_chunks_done=int(h.get("db_clean_chunks_done", 0)),
            db_clean_chunks_failed=int(h.get("db_clean_chunks_failed", 0)),
        )


def read_counters(redis_client: Any, prefix: str) -> Counters:
    """The counters under *prefix*; all zero before the first chunk."""
    raw = redis_client.hgetall(metrics_key(prefix))
    return Counters.from_hash({_text(k): _text(v) for k, v in raw.items()})


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _incr(registry: Any, name: str, by: int) -> None:
    registry.client.hincrby(metrics_key(registry.prefix), name, by)


def count_retry(registry: Any) -> None:
    """One more retry of a chunk task. Never raises: the run store may be why it retries."""
    try:
        _incr(registry, "chunks_retried", 1)
    except Exception as exc:
        _log().warning("retry_not_counted", error=type(exc).__name__)


def count_orphans_deleted(registry: Any, table_name: str, rows: int) -> None:
    """Rows one committed orphan batch deleted. Never raises: a metric must not fail a sweep
    whose rows are already gone (a failed count is logged instead)."""
    try:
        _incr(registry, f"rows_deleted:{table_name}", rows)
    except Exception as exc:
        _log().warning("orphan_rows_not_counted", rows=rows, error=type(exc).__name__)
