"""Reading what worker processes wrote: structlog JSON events of one run, Celery's task
runtimes, when each chunk's DELETE began, the first failed task; and forgetting the Redis keys
one bench method left behind."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SUCCEEDED = re.compile(r"^Task statesweep\.delete_chunk\[[^]]+\] succeeded in ([0-9.e-]+)s")


def task_seconds(events: list[dict[str, Any]]) -> list[float]:
    """Celery's own runtime of each delete_chunk task (run_chunk plus the task wrapper)."""
    found = (_SUCCEEDED.match(str(e.get("event", ""))) for e in events)
    return [float(m.group(1)) for m in found if m]


def forget_redis_keys(redis_url: str, env: dict[str, str]) -> int:
    """Delete what one bench method left in Redis: its run records and lock (key prefix) and
    its queues' bindings (kombu keeps those without expiry). Returns keys deleted."""
    import redis

    client = redis.Redis.from_url(redis_url)
    patterns = [env["STATESWEEP_KEY_PREFIX"] + ":*"]
    for queue in (env["STATESWEEP_CONTROL_QUEUE"], env["STATESWEEP_CHUNK_QUEUE"]):
        patterns += [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
    keys = [k for p in patterns for k in client.scan_iter(match=p, count=1000)]
    deleted = int(client.delete(*keys)) if keys else 0
    client.close()
    return deleted


def wall(event: dict[str, Any]) -> float:
    """The event's structlog timestamp as epoch seconds (every process shares this clock)."""
    return dt.datetime.fromisoformat(str(event["timestamp"])).timestamp()


def chunk_starts(chunks: list[dict[str, Any]]) -> list[float]:
    """When each chunk's DELETE began: chunk_deleted is logged after it, with its ms."""
    return sorted(wall(e) - float(e["ms"]) / 1000 for e in chunks)


def log_events(path: Path, run_id: str) -> list[dict[str, Any]]:
    """The structlog JSON events of *run_id* in a worker's log (Celery's banner is skipped)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("run_id") == run_id:
            events.append(event)
    return events


@dataclass
class FailureWatch:
    """Celery's ``raised unexpected`` lines in worker logs, read incrementally: a chunk task that
    fails leaves its run unfinished until the run timeout, so the bench stops at the first."""

    paths: list[Path]
    offsets: dict[Path, int] = field(default_factory=dict)

    def first_failure(self) -> str | None:
        for path in self.paths:
            with open(path, "rb") as f:
                f.seek(self.offsets.get(path, 0))
                chunk = f.read()
            # Only whole lines; a partly written one is read again next time.
            whole = chunk[:chunk.rfind(b"\n") + 1]
            self.offsets[path] = self.offsets.get(path, 0) + len(whole)
            for line in whole.decode(errors="replace").splitlines():
                if "raised unexpected" in line:
                    try:
                        return str(json.loads(line)["event"])[:500]
                    except (ValueError, KeyError, TypeError):
                        return line[:500]
        return None
